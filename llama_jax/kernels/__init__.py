"""Hand-written accelerator kernels, each beside the plain-XLA computation it replaces (which the
tests hold it to). One kernel a module:

  decode_attention  one query per row over a (B, K, S, H) cache, reading each row's own length only
"""
