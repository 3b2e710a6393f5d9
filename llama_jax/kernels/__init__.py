"""Hand-written accelerator kernels (Pallas, lowered through Triton on GPUs), each beside the
plain-XLA computation it replaces (which the tests hold it to). One idea a module:

  decode_attention  one query per row over a (B, K, S, H) cache, reading each row's own length only;
                    and the same with rotary and the cache write in one kernel
  matvec            a decode step's matrix-vector products (plain, int8 or int4 weights) with
                    RMSNorm, SwiGLU or the residual add inside them
  decode_block      a decode step's block as five of these kernels; a batch's with XLA's GEMMs
                    around the attention kernel (and some products as matvec kernels)
  tiles             what Triton asks of their tiles (rows padded for its dot, float32 products)
"""
