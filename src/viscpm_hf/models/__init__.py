"""The transformers models of the project, each in a folder of its own as in `transformers.models`:

- `viscpm_chat`: VisCPM-Chat for any vision tower and any causal LLM (the MPM bridge, LLaVA-style);
- `viscpm_chat_cpmbee`: the released VisCPM-Chat (BEiT-3 + CPM-Bee), whose LLM reads structured prompts and decodes
  by the original's rules;
- `cpmbee`: CPM-Bee, the bilingual LLM of the releases (model, tokenizer, prompt structure, decoding);
- `beit3`: BEiT-3 with learned queries, the released vision bridge.

Their model classes share `strict_loading`: `from_pretrained` refuses a folder whose tensors do not cover the model.
"""
