"""The decoding rules of the original VisCPM generator, as a logits processor that `generate` picks up.

They are switched on by `generation_config.cpmbee_decoding = {"temperature": ..., "repetition_penalty": ...}`:

- `<unk>` may be written only when the prompt holds it (it then stands for the prompt's first unknown string);
- a CTRL-style repetition penalty (negative logits times the penalty, others divided by it) on the answer's tokens
  so far, its `<s>` included, never on the prompt; ext tokens count as their base id;
- the temperature, applied after the penalty.

With greedy search and sampling the rules act on raw logits, as the original's. transformers' beam search hands
processors log-probabilities instead: the temperature is then exact (log-softmax is shift invariant) but the
penalty is not the original's, so beam search matches the original only when repetition_penalty is 1.
"""

import torch
from transformers import LogitsProcessor


class CpmBeeDecodingLogitsProcessor(LogitsProcessor):
    def __init__(
        self,
        prompt_length: int,
        unk_token_id: int,
        vocab_size: int,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        ext_table_ids: torch.Tensor | None = None,
    ):
        if temperature <= 0 or repetition_penalty <= 0:
            raise ValueError(f"temperature and repetition_penalty must be > 0, got {temperature}, {repetition_penalty}.")
        self.prompt_length = prompt_length
        self.unk_token_id = unk_token_id
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty
        self.ext_table_ids = ext_table_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        unk_in_prompt = (input_ids[:, : self.prompt_length] == self.unk_token_id).any(-1)
        scores[~unk_in_prompt, self.unk_token_id] = -10000.0
        if self.repetition_penalty != 1.0:
            answer = self._base_ids(input_ids[:, self.prompt_length - 1 :])  # starts at the answer's <s>
            picked = torch.gather(scores, 1, answer)
            penalised = torch.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
            scores.scatter_(1, answer, penalised)
        return scores / self.temperature if self.temperature != 1.0 else scores

    def _base_ids(self, ids: torch.LongTensor) -> torch.LongTensor:
        if self.ext_table_ids is None or self.ext_table_ids.shape[-1] == 0:
            return ids
        # Beams repeat each row of the ext table; rows of `ids` may outnumber the table's rows by that factor.
        table = self.ext_table_ids.to(ids.device).repeat_interleave(ids.shape[0] // self.ext_table_ids.shape[0], 0)
        column = (ids - self.vocab_size).clamp(min=0, max=table.shape[1] - 1)
        return torch.where(ids >= self.vocab_size, torch.gather(table, 1, column), ids)


def cpmbee_decoding_processors(generation_config, prompt_length: int, vocab_size: int, model_kwargs: dict | None):
    """The processors `generation_config.cpmbee_decoding` asks for (none when it is unset)."""
    settings = getattr(generation_config, "cpmbee_decoding", None)
    if not settings:
        return []
    return [
        CpmBeeDecodingLogitsProcessor(
            prompt_length=prompt_length,
            unk_token_id=1,
            vocab_size=vocab_size,
            temperature=settings.get("temperature", 1.0),
            repetition_penalty=settings.get("repetition_penalty", 1.0),
            ext_table_ids=(model_kwargs or {}).get("ext_table_ids"),
        )
    ]
