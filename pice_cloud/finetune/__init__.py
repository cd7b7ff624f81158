"""`pice-cloud finetune`: LoRA-specialised expanders (edge SLMs) and sketchers (small cloud LLMs).

- `data`: training examples from ``{"instruction", "output"}`` JSONL, with the serving prompts;
- `config`: the run's configuration (YAML + flags);
- `train`: LoRA training with checkpoints and a report, then merging the adapter and installing
  the result in the model store (`pice_edge.model_store.install`);
- `cli`: the ``finetune`` sub-command.

torch, transformers and peft are imported only when training starts.
"""

from pice_cloud.finetune.config import FinetuneConfig, load_finetune_config
from pice_cloud.finetune.data import Example, Prepared, Split, prepare, split_answer
from pice_cloud.finetune.train import prepare_for

__all__ = ["Example", "FinetuneConfig", "Prepared", "Split", "load_finetune_config", "prepare", "prepare_for",
           "split_answer"]
