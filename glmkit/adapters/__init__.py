"""Fine-tuning adapters on a GLM: LoRA (lora.py: the modules, apply/merge; peft_format.py: PEFT folders in the
official key names of each layout)."""
