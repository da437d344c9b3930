"""examples/train_chat.py on the paper's model: a CPM-Bee VisCPM-Chat converted from the tiny original (CPU)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from example_scripts import ROOT, load_example
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from parity import PARITY_DIR, json_file, tensors
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from viscpm_hf.models.cpmbee.markup_cpmbee import escape_markup
from viscpm_hf.mpm.data import conversation_dataset, split_assistant_turns
from viscpm_hf.training.cpmbee import CpmBeeChatCollator, ModelLossSFTTrainer


train_chat = load_example("train_chat")
CPU = ["--use_cpu", "--report_to", "none", "--bf16", "false", "--save_strategy", "no", "--logging_steps", "1",
       "--per_device_train_batch_size", "2", "--seed", "0", "--dataloader_num_workers", "0"]  # fmt: skip
HUB_FILES = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json",
             "vocab.txt", "chat_template.jinja", "README.md"}  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def run(model, workspace, output, *extra, stage="sft", data="conversations.json"):
    args = ["--model_name_or_path", str(model), "--stage", stage, "--data", str(workspace / data), "--image_folder",
            str(workspace / "images"), "--output_dir", str(output), *CPU, *extra]  # fmt: skip
    return train_chat.main(args)


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture(scope="module")
def processor(cpmbee_chat):
    return AutoProcessor.from_pretrained(cpmbee_chat)


@pytest.fixture(scope="module")
def examples(chat_workspace):
    return split_assistant_turns(conversation_dataset(chat_workspace / "conversations.json", chat_workspace / "images"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def message(role: str, text: str, image: bool = False) -> dict:
    return {"role": role, "content": ([{"type": "image", "text": None}] if image else []) + [{"type": "text", "text": text}]}


# --- what the loss covers --------------------------------------------------------------------------------------


def test_every_answer_is_one_example_and_the_labels_are_exactly_its_tokens(processor, examples):
    """8 examples from 4 two-turn chats; each labels its answer's tokens and `</s>`, nothing of prompt, image, padding."""
    assert len(examples) == 8
    tokenizer = processor.tokenizer
    batch = CpmBeeChatCollator(processor)([examples[i] for i in range(len(examples))])
    labels, ids = batch["labels"], batch["input_ids"]
    for row, example in enumerate(examples):
        answer = example["messages"][-1]["content"][0]["text"]
        pieces = tokenizer.tokenize_markup(escape_markup(answer))
        trained = labels[row] != -100
        assert int(trained.sum()) == len(pieces) + 1  # the answer, then </s>
        assert trained.nonzero().flatten().tolist() == list(range(int(trained.nonzero()[0]), int(trained.nonzero()[-1]) + 1))
        assert labels[row, trained][-1] == tokenizer.eos_token_id
        assert not (trained & (batch["context"][row] == 1)).any()  # prompt tokens
        assert not (trained & (ids[row] == processor.image_token_id)).any()
        assert not (trained & (batch["attention_mask"][row] == 0)).any()
        if "𠀀" not in answer:
            assert tokenizer.decode(labels[row, trained]) == escape_markup(answer) + "</s>"
    # The OOV answer: its second unknown string (龘, sub id 1) is labelled with its ext column; the batch shares one
    # ext table, as the original collater built it.
    oov = next(row for row, example in enumerate(examples) if "𠀀" in example["messages"][-1]["content"][0]["text"])
    assert labels[oov][labels[oov] >= tokenizer.vocab_size].tolist() == [tokenizer.vocab_size]
    assert batch["ext_table_ids"][:, 0].tolist() == [1] * 8 and batch["ext_table_sub"][:, 0].tolist() == [1] * 8


def test_answers_are_causal_and_prompts_bidirectional(cpmbee_chat, processor, examples):
    """Changing the answer's last word leaves the logits before it alone (no peeking at labels); changing the
    question's last word changes the logits of the whole prompt, image positions included."""
    model = AutoModelForImageTextToText.from_pretrained(cpmbee_chat).eval()
    collate = CpmBeeChatCollator(processor)
    first = examples[0]
    edited_answer = {**first, "messages": [*first["messages"][:-1], message("assistant", "Shape 0!")]}
    edited_question = {**first, "messages": [message("user", "What is that?", image=True), first["messages"][-1]]}
    batches = [collate([example]) for example in (first, edited_answer, edited_question)]
    with torch.no_grad():
        logits = [model(**batch).logits[0] for batch in batches]
    edited = int((batches[1]["input_ids"][0] != batches[0]["input_ids"][0]).nonzero()[0])
    assert batches[0]["labels"][0, edited] != -100  # an answer token
    torch.testing.assert_close(logits[1][:edited], logits[0][:edited], rtol=0, atol=1e-6)
    assert (logits[1][edited:] - logits[0][edited:]).abs().amax() > 1e-3
    image_positions = batches[0]["input_ids"][0] == processor.image_token_id
    assert (logits[2][image_positions] - logits[0][image_positions]).abs().amax() > 1e-3


def test_training_loss_is_the_originals(cpmbee_chat, processor, tmp_path):
    """The original's training batch (two chats, one multi-turn) through the collator and the trainer's loss gives the
    original's loss. TRL's own SFT loss (its fused LM head, `hidden @ lm_head.weight`) does not: it drops CPM-Bee's
    1/sqrt(hidden_size) and ext columns, which is why the script trains CPM-Bee with ModelLossSFTTrainer."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    image0, image1 = str(PARITY_DIR / "vision_image0.png"), str(PARITY_DIR / "vision_image1.png")
    chats = [
        {"images": [image0], "messages": [message("user", "What is in the image?", True),
                                          message("assistant", "A red circle and a green square.")]},
        {"images": [image1], "messages": [message("user", "这是什么？", True), message("assistant", "这是一只猫。"),
                                          message("user", "它在做什么？"), message("assistant", "它在睡觉 <zzz>。")]},
    ]  # fmt: skip
    batch = CpmBeeChatCollator(processor)(chats)
    batch["pixel_values"] = tensors("chat_e2e.safetensors")["train_batch.pixel_values"]  # Pillow 9.5's resizing
    assert int((batch["labels"] != -100).sum()) == 18  # the original's 18 targets

    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=None, bf16=False)
    dataset = Dataset.from_list(chats)
    expected = json_file("chat_e2e.json")["train_batch"]["loss"]
    losses = {}
    for trainer_class in (ModelLossSFTTrainer, SFTTrainer):
        model = AutoModelForImageTextToText.from_pretrained(cpmbee_chat)
        trainer = trainer_class(model=model, args=config, train_dataset=dataset, processing_class=processor,
                                data_collator=CpmBeeChatCollator(processor))  # fmt: skip
        with torch.no_grad():
            losses[trainer_class] = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert losses[ModelLossSFTTrainer] == pytest.approx(expected, rel=1e-5)
    assert losses[SFTTrainer] != pytest.approx(expected, rel=1e-2)



def test_trls_plain_sft_trainer_is_refused_with_the_way_to_train(cpmbee_chat, processor, tmp_path):
    """A user following TRL's docs (its own collator and fused-head loss) would train the bidirectional prompt and a
    head without CPM-Bee's scaling and ext columns; the first step stops and names what trains it right."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    chats = [{"images": [str(PARITY_DIR / "vision_image0.png")], "messages": [
        message("user", "What is in the image?", True), message("assistant", "A red circle and a green square.")]}]  # fmt: skip
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=None, bf16=False,
                       max_steps=1, per_device_train_batch_size=1, save_strategy="no")  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(cpmbee_chat)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(chats), processing_class=processor)
    with pytest.raises(ValueError, match="CpmBeeChatCollator.*ModelLossSFTTrainer"):
        trainer.train()

# --- the script --------------------------------------------------------------------------------------------------


def test_sft_trains_llm_and_bridge_and_exports_a_hub_clean_folder(cpmbee_chat, chat_workspace, tmp_path):
    out = tmp_path / "run"
    run(cpmbee_chat, chat_workspace, out, "--max_steps", "2", "--learning_rate", "1e-2", "--tune_vision", "false",
        "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1")  # fmt: skip
    moved = changed(load_file(cpmbee_chat / "model.safetensors"), load_file(out / "model" / "model.safetensors"))
    assert any(n.startswith("model.llm.model.layers.") for n in moved) and any(n.startswith("model.bridge.") for n in moved)
    assert not any(n.startswith("model.vision_tower.") for n in moved)
    # The folder to upload: weights, configs, processor, card; the run's files beside it.
    assert {p.name for p in (out / "model").iterdir()} == HUB_FILES
    assert {p.name for p in out.iterdir()} >= {"model", "checkpoint-2", "train_log.json", "training_args.json"}
    assert not (out / "checkpoint-1").exists()  # --save_total_limit 1, applied once checkpoint-2 was complete
    assert not [p for p in out.rglob("*training_args.bin")]
    assert json.loads((out / "training_args.json").read_text())["learning_rate"] == 1e-2
    assert "model" in {p.name for p in out.iterdir()} and not [p for p in out.iterdir() if p.name.endswith(".partial")]
    card = (out / "model" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "2 steps" in card
    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    answer, _ = model.chat(str(chat_workspace / "images" / "0.png"), "What is it?", AutoProcessor.from_pretrained(out / "model"),
                           num_beams=1, max_new_tokens=3)  # fmt: skip
    assert isinstance(answer, str)


def test_pretrain_keeps_cpmbee_frozen(cpmbee_chat, chat_workspace, tmp_path):
    out = tmp_path / "run"
    trainer = run(cpmbee_chat, chat_workspace, out, "--max_steps", "2", "--learning_rate", "1e-2", stage="pretrain",
                  data="captions.json")  # fmt: skip
    moved = changed(load_file(cpmbee_chat / "model.safetensors"), load_file(out / "model" / "model.safetensors"))
    assert any(n.startswith("model.bridge.") for n in moved) and any(n.startswith("model.vision_tower.") for n in moved)
    assert not any(n.startswith("model.llm.") for n in moved)
    losses = [entry["loss"] for entry in json.loads((out / "train_log.json").read_text())]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses) and trainer.state.global_step == 2


def test_lora_merged_model_equals_the_adapter_model(cpmbee_chat, chat_workspace, processor, examples, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    run(cpmbee_chat, chat_workspace, out, "--max_steps", "2", "--learning_rate", "1e-2", "--lora", "--merge_adapters",
        "--tune_vision", "false", "--save_strategy", "steps", "--save_steps", "2")  # fmt: skip
    assert {p.name for p in (out / "model").iterdir()} == HUB_FILES  # merged: a plain model folder
    merged = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(cpmbee_chat), out / "checkpoint-2").eval()
    base = load_file(cpmbee_chat / "model.safetensors")
    moved = changed(base, {k: v for k, v in merged.state_dict().items() if k in base})
    assert any(".llm.model.layers." in n and n.endswith("proj.weight") for n in moved)  # the merged deltas
    assert any(n.startswith("model.bridge.") for n in moved) and not any(n.startswith("model.vision_tower.") for n in moved)
    batch = CpmBeeChatCollator(processor)([examples[i] for i in range(4)])
    with torch.no_grad():
        expected, actual = adapter(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_qlora_quantizes_exactly_the_llms_linears(cpmbee_chat, chat_workspace, tmp_path):
    """4 bits for every Linear of the CPM-Bee decoder, by exact name; vision tower, bridge and head stay nn.Linear."""
    from bitsandbytes.nn import Linear4bit

    args, training = train_chat.HfArgumentParser((train_chat.ScriptArguments, train_chat.SFTConfig)).parse_args_into_dataclasses(
        args=["--model_name_or_path", str(cpmbee_chat), "--qlora", "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
    )  # fmt: skip
    model = train_chat.load_model(args, training)
    linears = {name: type(module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    llm = {name for name in linears if name.startswith("model.llm.model.layers.")}
    assert len(llm) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert {name for name, kind in linears.items() if issubclass(kind, Linear4bit)} == llm
    assert all(linears[name] is torch.nn.Linear for name in set(linears) - llm)
    assert any(n.startswith("model.vision_tower.") for n in linears) and any(n.startswith("model.bridge.") for n in linears)
    assert linears["model.llm.lm_head"] is torch.nn.Linear and model.model.llm.lm_head.weight.dtype == torch.float32

    out = tmp_path / "run"
    run(cpmbee_chat, chat_workspace, out, "--max_steps", "1", "--qlora", "--tune_vision", "false")
    assert {p.name for p in (out / "model").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert 0 < json.loads((out / "train_log.json").read_text())[0]["loss"] < 20


def test_qlora_refuses_clearly_where_bitsandbytes_cannot_run(cpmbee_chat, chat_workspace, tmp_path, monkeypatch):
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    with pytest.raises(SystemExit, match="--qlora cannot run here: .*no 4-bit kernels for cpu .*Use --lora"):
        run(cpmbee_chat, chat_workspace, tmp_path / "run", "--qlora")
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(SystemExit, match="bitsandbytes is not installed"):
        run(cpmbee_chat, chat_workspace, tmp_path / "run", "--qlora")


@pytest.mark.timeout(600)
def test_two_processes_train_as_one_with_the_whole_batch(cpmbee_chat, chat_workspace, tmp_path):
    """DDP over gloo, 1 example per process, against one process with 2: the same loss at every step."""
    common = ["--model_name_or_path", str(cpmbee_chat), "--data", str(chat_workspace / "conversations.json"),
              "--image_folder", str(chat_workspace / "images"), "--max_steps", "3", "--learning_rate", "1e-3",
              "--tune_vision", "false", *CPU]  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(ROOT / "examples" / "train_chat.py"), *common, "--output_dir", str(tmp_path / "ddp"),
               "--per_device_train_batch_size", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    train_chat.main([*common, "--output_dir", str(tmp_path / "one")])
    ddp, one = ([e["loss"] for e in json.loads((tmp_path / name / "train_log.json").read_text())] for name in ("ddp", "one"))
    assert len(ddp) == 3 and ddp == pytest.approx(one, rel=1e-4)
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


def test_push_to_hub_uploads_the_exported_model_and_the_trainer_uploads_nothing(cpmbee_chat, chat_workspace, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    run(cpmbee_chat, chat_workspace, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
        "--push_to_hub", "--hub_model_id", "org/tiny-sft", "--hub_token", "hf_secret", "--language", "en", "zh", "de")  # fmt: skip
    # One repo and one commit, after training: the Trainer's own pushes (output_dir, at every save) never ran.
    assert hub.repos == [{"repo_id": "org/tiny-sft", "token": "hf_secret", "private": None, "exist_ok": True}]
    files = hub.commit["files"]
    assert files == {name: (out / "model" / name).read_bytes() for name in HUB_FILES}
    assert (out / "checkpoint-2").is_dir() and hub.commit["message"] == "train_chat.py: stage sft, 2 steps"
    card = ModelCard(files["README.md"].decode())
    converted = ModelCard.load(cpmbee_chat / "README.md").data  # the starting folder's card passes on its metadata
    assert (card.data.base_model, card.data.license_link) == (converted.base_model, converted.license_link)
    assert card.data.language == ["en", "zh", "de"] and card.data.library_name == "transformers"
    assert 'from_pretrained("org/tiny-sft")' in card.text
    arguments = (out / "training_args.json").read_text()
    assert json.loads(arguments)["hub_model_id"] == "org/tiny-sft" and "hf_secret" not in arguments
