"""LoRA adapters for the garden's chat models: a Hugging Face PEFT adapter converted to
llama.cpp's GGUF adapter format, a GGUF adapter checked against the very base file it is
for, either one installed with its manifest (kind adapter), and specialist manifests
that name them.

Every check here is one llama.cpp makes when it loads an adapter (``llama_adapter_lora_init``:
the architecture, the pairs of lora_a/lora_b, each pair's shapes against the base's
tensor) or one it cannot make (the rank the manifest records, values that are not
finite), so that a bad adapter is refused at import with a message that names the
tensor, the expected and the actual value, rather than when a clinician's request first
loads it. Nothing is installed, and no file is left behind, when anything is refused.

- formats.py: GGUF headers and tensors, the base model's shapes, the checks of LoRA
  tensor pairs both formats share; AdapterRefused.
- convert.py: PEFT to GGUF (peft_to_gguf), the GGUF adapter check (check_gguf_adapter),
  AdapterFacts.
- install.py: install_adapter and write_specialist, the manifests they write.

Imports go one way: install, then convert, then formats.
"""

from appliance.adapters.convert import AdapterFacts, check_gguf_adapter, peft_to_gguf
from appliance.adapters.formats import AdapterRefused
from appliance.adapters.install import install_adapter, write_specialist

__all__ = [
    "AdapterFacts",
    "AdapterRefused",
    "check_gguf_adapter",
    "install_adapter",
    "peft_to_gguf",
    "write_specialist",
]
