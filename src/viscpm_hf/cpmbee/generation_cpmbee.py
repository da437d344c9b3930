"""The decoding rules of the original VisCPM generator, as a logits processor that `generate` picks up.

They are switched on by `generation_config.cpmbee_decoding = {"temperature": ..., "repetition_penalty": ...}`:

- `<unk>` may be written only when the prompt holds it (it then stands for the prompt's first unknown string);
- a CTRL-style repetition penalty (negative logits times the penalty, others divided by it) on the answer's tokens
  so far, its `<s>` included, never on the prompt; ext tokens count as their base id;
- the temperature, applied after the penalty.

The rules act on raw logits, as the original's. Greedy search and sampling hand processors raw logits; beam
search hands them log-probabilities, from which a CTRL penalty cannot be computed, so in beam search the processor
reads the raw logits of the step from the model's output (`LastStepLogits`) and returns the log-probabilities the
original beam search scores with.
"""

import weakref

import torch
from torch import nn
from transformers import LogitsProcessor


class LastStepLogits:
    """The raw last-position logits of `model`'s latest forward; the hook goes away with this object."""

    def __init__(self, model: nn.Module):
        self.logits: torch.Tensor | None = None
        reference = weakref.ref(self)

        def store(module, args, output):
            keeper = reference()
            if keeper is not None:
                keeper.logits = output.logits[:, -1].float()

        self._handle = model.register_forward_hook(store)

    def __del__(self):
        self._handle.remove()


class CpmBeeDecodingLogitsProcessor(LogitsProcessor):
    def __init__(
        self,
        prompt_length: int,
        unk_token_id: int,
        vocab_size: int,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        ext_table_ids: torch.Tensor | None = None,
        raw_logits: LastStepLogits | None = None,
    ):
        """`raw_logits` is given in beam search, whose scores are log-probabilities."""
        if temperature <= 0 or repetition_penalty <= 0:
            raise ValueError(f"temperature and repetition_penalty must be > 0, got {temperature}, {repetition_penalty}.")
        self.prompt_length = prompt_length
        self.unk_token_id = unk_token_id
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty
        self.ext_table_ids = ext_table_ids
        self.raw_logits = raw_logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = (self.raw_logits.logits if self.raw_logits is not None else scores).clone()
        unk_in_prompt = (input_ids[:, : self.prompt_length] == self.unk_token_id).any(-1)
        scores[~unk_in_prompt, self.unk_token_id] = -10000.0
        if self.repetition_penalty != 1.0:
            answer = self._base_ids(input_ids[:, self.prompt_length - 1 :])  # starts at the answer's <s>
            picked = torch.gather(scores, 1, answer)
            penalised = torch.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
            scores.scatter_(1, answer, penalised)
        scores = scores / self.temperature if self.temperature != 1.0 else scores
        return scores.log_softmax(-1) if self.raw_logits is not None else scores

    def _base_ids(self, ids: torch.LongTensor) -> torch.LongTensor:
        if self.ext_table_ids is None or self.ext_table_ids.shape[-1] == 0:
            return ids
        # Beams repeat each row of the ext table; rows of `ids` may outnumber the table's rows by that factor.
        table = self.ext_table_ids.to(ids.device).repeat_interleave(ids.shape[0] // self.ext_table_ids.shape[0], 0)
        column = (ids - self.vocab_size).clamp(min=0, max=table.shape[1] - 1)
        return torch.where(ids >= self.vocab_size, torch.gather(table, 1, column), ids)


def cpmbee_decoding_processors(
    generation_config, prompt_length: int, vocab_size: int, model_kwargs: dict | None, model: nn.Module
) -> list[LogitsProcessor]:
    """The processors `generation_config.cpmbee_decoding` asks for (none when it is unset); `model` is the one
    `generate` runs, whose raw logits beam search needs."""
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
            raw_logits=LastStepLogits(model) if (generation_config.num_beams or 1) > 1 else None,
        )
    ]
