import torch, certssb
from certssb.kernels import noise as _n, vote as _v
cases = {
 "aten-add": lambda: torch.ones(2)+torch.ones(3),
 "vote-noncontig": lambda: torch.ops.certssb.vote_accumulate(torch.randn(1,2,3), torch.zeros(3,2,dtype=torch.long).t(), torch.zeros(2,3,dtype=torch.long)),
 "noise-stream": lambda: torch.ops.certssb.noise.default(torch.rand(3,2), torch.ones(3), torch.arange(3), 0, -1, 0, 1),
 "noise-sigma": lambda: torch.ops.certssb.noise.default(torch.rand(3,2), torch.ones(2), torch.arange(3), 0, 1, 0, 1),
}
import sys
for name in sys.argv[1:]:
    try:
        cases[name]()
        print(name, "no error")
    except RuntimeError as e:
        print(name, "RuntimeError:", str(e).splitlines()[0])
