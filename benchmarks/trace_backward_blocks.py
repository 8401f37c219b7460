"""Single-process trace: live bytes of storages created from loss.backward's start, op by op,
param.grad held (no hooks release them: ZeRO-0/1 without overlap_comm)."""
import os, sys, weakref, traceback
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
sys.path.insert(0, "/work/wt-z01")
import memprof.models as MM
from memprof.train.model import build_model

model_name, ckpt, S, B = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
cfg = [v for k, v in vars(MM).items() if isinstance(v, dict) and model_name in v][0][model_name]
model = build_model(cfg, 0, activation_checkpointing=ckpt)
ids = torch.randint(0, 500, (B, S))

class Tracer(TorchDispatchMode):
    def __init__(s):
        super().__init__(); s.live = {}; s.total = 0; s.peak = 0; s.items = []; s.refs = []; s.n = 0; s.tl = []
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        s.n += 1
        ins = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage(); key = st.data_ptr()
                if st.nbytes() == 0 or key in s.live or key in ins or key in pre: continue
                s.live[key] = (st.nbytes(), str(func), tuple(t.shape), key); s.total += st.nbytes()
                def gone(_r, key=key, n=st.nbytes()):
                    if s.live.pop(key, None) is not None: s.total -= n
                s.refs.append(weakref.ref(st, gone))
        s.tl.append((NT.device_total - base0, str(func)))
        s.abs = max(getattr(s, 'abs', 0), NT.device_total - base0)
        if s.total > s.peak:
            s.peak = s.total; s.items = list(s.live.values()); s.op = (s.n, str(func))
        return out

from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
NT = NativeAllocationTracker().__enter__()
base0 = NT.device_total
out = model(input_ids=ids, labels=ids)
loss = out.loss; del out
pre = {p.untyped_storage().data_ptr() for p in model.parameters()}
start = NT.device_total - base0
tr = Tracer()
with tr:
    loss.backward()
grads = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
print("peak new-in-backward", tr.peak, "at op", tr.op, "ops", tr.n, "all grads", grads)
gp = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
g = sum(n for n, f, sh, k in tr.items if k in gp)
print("absolute (beyond params+ids) backward peak", tr.abs, "at backward start", start)
print("at peak: grads", g, "other", tr.peak - g)
for n, f, sh, k in sorted(tr.items, key=lambda x: -x[0])[:int(os.environ.get("TOP", "0"))]:
    print(f"{n:>8} {f} {sh} {'GRAD' if k in gp else ''}")

import os
if os.environ.get("TL"):
    with open(os.environ["TL"], "w") as fh:
        for i, (n, f) in enumerate(tr.tl):
            fh.write(f"{i} {n} {f}\n")
