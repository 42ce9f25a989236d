"""Make tests/data/peft_tiny/: two PEFT LoRA adapters over a seeded tiny Llama, plus the logits they give."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": True, "initializer_range": 0.2, "rms_norm_eps": 1e-5}
ADAPTERS = {
    "lora_all": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"]),
    "rslora_qv": peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "v_proj"], use_rslora=True),
}
INPUT_IDS = torch.tensor([[1, 5, 9, 14, 2, 33, 63, 0]])


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def main() -> None:
    OUT = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        logits = {"base": base_model()(INPUT_IDS).logits[0].numpy()}
    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1):
        model = peft.get_peft_model(base_model(), config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # B starts at zero (a no-op adapter): give every LoRA weight seeded values
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        model.eval()
        with torch.no_grad():
            logits[name] = model(INPUT_IDS).logits[0].numpy()
        model.save_pretrained(str(OUT / name))
        (OUT / name / "README.md").unlink()  # a generated model card, 5 KB, not read when loading
    np.savez(OUT / "logits.npz", input_ids=INPUT_IDS.numpy(), **logits)


if __name__ == "__main__":
    main()
