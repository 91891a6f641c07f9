"""tulu: a pure-PyTorch reimplementation of the Tulu 3 post-training recipe."""
