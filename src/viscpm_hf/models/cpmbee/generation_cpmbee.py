"""The decoding of the original VisCPM generator, carried by each `generate` call.

`cpmbee_decoding={"temperature": ..., "repetition_penalty": ...}` (a `generate` argument, or an attribute of the
generation config, as converted folders set it) switches on:

- the original's logit rules, as a logits processor on raw logits: `<unk>` may be written only when the prompt
  holds it (it then stands for the prompt's first unknown string); a CTRL-style repetition penalty (negative logits
  times the penalty, others divided by it) on the answer's tokens so far, its `<s>` included, never on the prompt;
  ext tokens count as their base id; then the temperature;
- with `num_beams > 1`, the original's beam search (`cpmbee_beam_search`, handed to `generate` as
  `custom_generate`): it scores raw-logit rules before the log-softmax, and stops by its own rule.

`cpmbee_generate_kwargs` turns the setting into these `generate` arguments for one call; nothing is stored on the
model, so concurrent calls on one model are independent. The models whose `generate` applies them are the ones that own
CPM-Bee: `CpmBeeForCausalLM` and `VisCPMChatCpmBeeForConditionalGeneration`.
"""

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput


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
        """Acts on raw logits (what greedy search, sampling and `cpmbee_beam_search` hand it)."""
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


def cpmbee_decoding_settings(kwargs: dict, model_generation_config: GenerationConfig) -> dict | None:
    """The `cpmbee_decoding` of one `generate` call, as transformers merges a custom generation field: the call's
    argument, else the passed `generation_config`'s, else the model's own. `cpmbee_decoding=None` (or `{}`) turns the
    original's rules off for the call."""
    if "cpmbee_decoding" in kwargs:
        return kwargs.pop("cpmbee_decoding")
    passed = kwargs.get("generation_config")
    if passed is not None and "cpmbee_decoding" in passed.to_dict():
        return passed.cpmbee_decoding
    return getattr(model_generation_config, "cpmbee_decoding", None)


def effective_num_beams(kwargs: dict, model_generation_config: GenerationConfig) -> int:
    """`num_beams` as `generate` will read it: the argument, else the passed config's (when set), else the model's."""
    passed = kwargs.get("generation_config")
    for value in (kwargs.get("num_beams"), getattr(passed, "num_beams", None), model_generation_config.num_beams):
        if value is not None:
            return value
    return 1


def cpmbee_generate_kwargs(
    kwargs: dict, prompt_length: int, vocab_size: int, unk_token_id: int, model_generation_config: GenerationConfig
) -> tuple[dict, object | None]:
    """`generate` keyword arguments with this call's `cpmbee_decoding` applied (its logits processor first, and the
    original beam search when beams are asked for), and the streamer to feed once the answer is known.

    A beam search knows its answer only at its end: a `streamer` is then held back from `generate` and gets the prompt
    and the final answer afterwards (`stream_final_answer`), so a consumer always sees the answer and its end.
    """
    settings = cpmbee_decoding_settings(kwargs, model_generation_config)
    if not settings:
        return kwargs, None
    processor = CpmBeeDecodingLogitsProcessor(
        prompt_length=prompt_length,
        unk_token_id=unk_token_id,
        vocab_size=vocab_size,
        temperature=settings.get("temperature", 1.0),
        repetition_penalty=settings.get("repetition_penalty", 1.0),
        ext_table_ids=kwargs.get("ext_table_ids"),
    )
    kwargs["logits_processor"] = LogitsProcessorList([processor, *(kwargs.get("logits_processor") or [])])
    streamer = None
    if effective_num_beams(kwargs, model_generation_config) > 1 and kwargs.get("custom_generate") is None:
        kwargs["custom_generate"] = cpmbee_beam_search
        streamer = kwargs.pop("streamer", None)
    return kwargs, streamer


def check_streamed_batch(streamer, input_ids: torch.Tensor) -> None:
    """transformers' streamers take one sequence; refused before any work rather than deep inside decoding."""
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(
            f"A streamer shows one answer, but the batch has {input_ids.shape[0]} prompts: stream one prompt at a "
            "time, or generate the batch without a streamer."
        )


def stream_final_answer(streamer, input_ids: torch.Tensor, output) -> None:
    """Feeds a held-back streamer as `generate` would have: the prompt, then the (best) answer, then `end()`."""
    sequences = output.sequences if hasattr(output, "sequences") else output
    streamer.put(input_ids[0].cpu())
    streamer.put(sequences[0, input_ids.shape[1] :].cpu())
    streamer.end()


class FinishedHypotheses:
    """One prompt's finished answers, as the original keeps them: at most `num_beams`, each scored by its summed
    log-probability / length**length_penalty (the length counts the answer's tokens, `</s>` included)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.items: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def offer(self, tokens: list[int], sum_logprob: float) -> None:
        score = sum_logprob / len(tokens) ** self.length_penalty
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.num_beams:
                self.items.remove(min(self.items, key=lambda item: item[0]))
                self.worst = min(item[0] for item in self.items)
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprob: float, step: int) -> bool:
        """Checked at step `step` before its candidates are used: the best of them (summed log-probability), divided
        by step**length_penalty, cannot beat the worst finished answer. (transformers instead extends first and
        normalises by the length after the step.)"""
        if len(self.items) < self.num_beams or step == 0:
            return False
        return self.worst >= best_sum_logprob / step**self.length_penalty


def cpmbee_beam_search(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    **model_kwargs,
) -> torch.LongTensor | GenerateBeamDecoderOnlyOutput:
    """The original VisCPM beam search as a `custom_generate` decoding loop (inputs and cache prepared by `generate`,
    `num_beams` rows per prompt).

    Step `i` (0 feeds the prompt, whose last token is the answer's `<s>`): raw logits -> `logits_processor` (the
    CPM-Bee rules) -> log-softmax + beam score -> the top `2 * num_beams` candidates over all beams. The prompt stops
    if it has `num_beams` finished answers and the worst scores >= the best candidate's sum / i**length_penalty.
    Otherwise candidates ending in `</s>` (every candidate at the last step) become finished answers and the others
    the next beams, until `num_beams` of them. Returns each prompt followed by its best answer(s), padded.
    """
    if synced_gpus:
        raise ValueError("CPM-Bee's beam search does not support synced_gpus.")
    num_beams = generation_config.num_beams
    num_return = generation_config.num_return_sequences or 1
    if num_return > num_beams:
        raise ValueError(f"num_return_sequences ({num_return}) must be <= num_beams ({num_beams}).")
    rows, prompt_length = input_ids.shape
    batch_size, device = rows // num_beams, input_ids.device
    eos = generation_config.eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad_id = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
    last_step = generation_config.max_length - prompt_length - 1

    finished = [FinishedHypotheses(num_beams, generation_config.length_penalty) for _ in range(batch_size)]
    done = [False] * batch_size
    beam_scores = torch.full((batch_size, num_beams), -1e9, device=device)
    beam_scores[:, 0] = 0.0
    sequences = input_ids
    for step in range(last_step + 1):
        model_inputs = model.prepare_inputs_for_generation(
            sequences, next_sequence_length=None if step == 0 else 1, is_first_iteration=step == 0, **model_kwargs
        )
        outputs = model(**model_inputs, return_dict=True)
        model_kwargs["cache"] = outputs.cache
        scores = logits_processor(sequences, outputs.logits[:, -1].float())
        del outputs
        log_probs = scores.log_softmax(-1) + beam_scores.view(-1, 1)
        width = log_probs.shape[-1]
        top_sums, top_ids = log_probs.view(batch_size, -1).topk(2 * num_beams, dim=-1)
        top_sums, top_ids = top_sums.tolist(), top_ids.tolist()

        next_rows, next_tokens, next_scores = [], [], []
        for prompt in range(batch_size):
            if not done[prompt] and finished[prompt].is_done(top_sums[prompt][0], step):
                done[prompt] = True
            chosen = []
            if not done[prompt]:
                for sum_logprob, flat in zip(top_sums[prompt], top_ids[prompt]):
                    beam, token = divmod(flat, width)
                    row = prompt * num_beams + beam
                    if token in eos_ids or step == last_step:
                        answer = sequences[row, prompt_length:].tolist() + [token]
                        finished[prompt].offer(answer, sum_logprob)
                    else:
                        chosen.append((row, token, sum_logprob))
                    if len(chosen) == num_beams:
                        break
                done[prompt] = step == last_step
            # A finished prompt (or one short of live candidates) keeps dead beams that nothing will pick.
            chosen += [(prompt * num_beams, pad_id, -1e9)] * (num_beams - len(chosen))
            for row, token, score in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if all(done):
            break
        beam_index = torch.tensor(next_rows, device=device)
        model_kwargs["cache"].reorder_cache(beam_index)
        sequences = torch.cat([sequences[beam_index], torch.tensor(next_tokens, device=device)[:, None]], dim=-1)
        beam_scores = torch.tensor(next_scores, device=device).view(batch_size, num_beams)
        if model_kwargs.get("attention_mask") is not None:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)

    best = []
    for prompt, hypotheses in enumerate(finished):
        ranked = sorted(hypotheses.items, key=lambda item: item[0], reverse=True)[:num_return]
        best += [(score, input_ids[prompt * num_beams].tolist() + answer) for score, answer in ranked]
    length = max(len(tokens) for _, tokens in best)
    output = torch.tensor([tokens + [pad_id] * (length - len(tokens)) for _, tokens in best], device=device)
    if generation_config.return_dict_in_generate:
        return GenerateBeamDecoderOnlyOutput(
            sequences=output, sequences_scores=torch.tensor([score for score, _ in best], device=device)
        )
    return output
