"""tulu: a pure-PyTorch reimplementation of the Tulu 3 post-training recipe."""
from tulu.companions import hide_unloadable

hide_unloadable()  # before anything imports transformers (see tulu/companions.py)
