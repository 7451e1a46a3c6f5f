import os

import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. This must be set
# before fnevr (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
