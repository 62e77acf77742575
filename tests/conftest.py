import os

import torch

# nothing in the tests may reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before
# triton is first imported (transformers imports it)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
