"""fnevr's Triton kernels (installed as `fnevr.kernels`). Each module wraps its kernels in plain
functions over contiguous tensors; autograd, checks and backend choice live in `fnevr.ops`.

Set TRITON_INTERPRET=1 before importing them to run them on CPU tensors through Triton's
interpreter (for tests on machines without a GPU; bf16 goes through fp32 there).
"""
