"""Build a Llama-family model under ZeRO-3's deepspeed.zero.Init with memprof's build_model and
train one step (world of one, gloo). build_model imports the transformers model class before it
enters zero.Init: importing it inside fails on torch 2.13 ("TypeError: Signature mismatch ...
tensor_pynew"). Run by tests/test_llama_family.py as ``python zero_init_build.py PORT PRESET``."""
import os
import sys

import deepspeed
import torch

from memprof.families.llama import llama_param_numels
from memprof.models import preset_config
from memprof.run.facts import count_parameters
from memprof.train.model import build_model


def main() -> None:
    # one rank on its own: the env:// rendezvous deepspeed.init_distributed reads
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = preset_config(sys.argv[2])
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "zero_allow_untested_optimizer": True}
    m = build_model(cfg, seed=0, init_context=deepspeed.zero.Init(config_dict_or_path=ds))
    print("partitioned:", all(hasattr(p, "ds_tensor") for p in m.parameters()),
          count_parameters(m) == sum(llama_param_numels(cfg)))
    engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=ds)
    ids = torch.randint(0, 256, (1, 16))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    print("step ok", float(loss))


if __name__ == "__main__":
    main()
