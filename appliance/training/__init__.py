"""Making specialists on the box (`appliance specialize`): a LoRA adapter trained on the
site's own chat examples, from the pinned GGUF's own weights. An optional extra
(`pip install '.[train]'`: torch); the serving path never imports it."""
