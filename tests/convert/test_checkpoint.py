"""Reading original checkpoints piece by piece, and an output folder that is never lost nor left half-written."""

import logging
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from viscpm_hf.convert import checkpoint as module
from viscpm_hf.convert.checkpoint import (
    FiniteCheck,
    OriginalCheckpoint,
    atomic_output_folder,
    clean_leftovers,
    refuse_output_over_inputs,
    write_safetensors_shards,
)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def old_output(tmp_path: Path) -> Path:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    return output


# --- reading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tensors_stream_in_bounded_pieces_that_join_into_the_original(tmp_path, suffix):
    state = {
        "w": torch.randn(7, 5), "h": torch.randn(3).half(), "b": torch.randn(2, 2).bfloat16(),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
    }  # fmt: skip
    path = tmp_path / f"ckpt{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    original = OriginalCheckpoint(path)
    assert sorted(original.keys()) == sorted(state)
    for key, tensor in state.items():
        assert original.shape(key) == tuple(tensor.shape) and original.dtype(key) == tensor.dtype
        pieces = [piece.clone() for piece in original.chunks(key, chunk_bytes=8)]
        assert all(piece.numel() * piece.element_size() <= 8 for piece in pieces)
        joined = torch.cat(pieces) if pieces else torch.empty(0, dtype=tensor.dtype)
        assert torch.equal(joined, tensor.reshape(-1)), key
        assert torch.equal(original.load(key, torch.float32), tensor.float())


def test_a_saved_view_streams_its_own_elements(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"t": base.t(), "row": base[1]}, tmp_path / "views.pt")  # saved with the whole storage
    original = OriginalCheckpoint(tmp_path / "views.pt")
    assert torch.equal(original.load("t"), base.t()) and torch.equal(original.load("row"), base[1])


def test_shards_written_from_pieces_load_back_identical(tmp_path):
    state = {f"layer.{i}": torch.randn(16, 3) for i in range(5)}
    save_file(state, str(tmp_path / "in.safetensors"))
    original = OriginalCheckpoint(tmp_path / "in.safetensors")
    keys = sorted(state)
    entries = [(f"new.{key}", original.shape(key), torch.float16) for key in keys]
    names = write_safetensors_shards(tmp_path, entries, lambda i: original.chunks(keys[i], torch.float16, 40), 100)
    assert len(names) == 5 and (tmp_path / "model.safetensors.index.json").is_file()
    written = {k: v for name in names for k, v in load_file(tmp_path / name).items()}
    assert written.keys() == {f"new.{key}" for key in keys}
    assert all(torch.equal(written[f"new.{key}"], state[key].half()) for key in keys)


@pytest.mark.parametrize(
    "tensor, reported",
    [
        (torch.zeros(2, dtype=torch.complex64), "dtype complex64"),
        (torch.zeros(2, dtype=torch.uint16), "dtype uint16"),
        (torch.zeros(2, dtype=torch.float8_e4m3fn), "dtype float8_e4m3fn"),
        (torch.eye(3).to_sparse(), "sparse_coo layout"),
    ],
    ids=["complex64", "uint16", "float8", "sparse"],
)
def test_tensors_of_other_kinds_are_refused_by_name(tmp_path, tensor, reported):
    torch.save({"fine": torch.zeros(1), "odd.weight": tensor}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=rf"1 tensors that cannot be converted: \['odd.weight: {reported}'\].*float16"):
        OriginalCheckpoint(tmp_path / "odd.pt")


@pytest.mark.parametrize("dtype, name", [(torch.complex64, "C64"), (torch.uint16, "U16"), (torch.float8_e5m2, "F8_E5M2")])
def test_safetensors_of_other_dtypes_are_refused_by_name(tmp_path, dtype, name):
    save_file({"odd.weight": torch.zeros(2, dtype=dtype)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match=rf"\['odd.weight: dtype {name}'\]"):
        OriginalCheckpoint(tmp_path / "odd.safetensors")


def test_keys_that_are_not_strings_are_refused(tmp_path):
    torch.save({0: torch.zeros(1), "llm.input_embedding.weight": torch.zeros(1), (1, 2): torch.zeros(1)}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match=r"2 keys that are not strings: 0 \(int\), \(1, 2\) \(tuple\)"):
        OriginalCheckpoint(tmp_path / "k.pt")


@pytest.mark.parametrize(
    "content",
    [struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 2) + b"[]", b"\x01"],
    ids=["header longer than the file", "header not an object", "too short"],
)
def test_a_broken_safetensors_file_is_refused(tmp_path, content):
    (tmp_path / "broken.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        OriginalCheckpoint(tmp_path / "broken.safetensors")


def test_safetensors_data_outside_the_file_is_refused(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match="'w' lies outside the file"):
        OriginalCheckpoint(tmp_path / "short.safetensors")


def test_the_finite_check_counts_nan_and_inf_per_tensor_including_cast_overflow(tmp_path):
    weights = torch.ones(10)
    weights[[2, 5]] = float("nan")
    big = torch.full((4,), 1e6)  # finite in float32, inf in float16
    torch.save({"w": weights, "big": big, "fine": torch.ones(3)}, tmp_path / "c.pt")
    original = OriginalCheckpoint(tmp_path / "c.pt")
    check = FiniteCheck()
    for key in ("w", "big", "fine"):
        for _ in check.watch(key, original.chunks(key, torch.float16, chunk_bytes=4)):
            pass
    assert check.found == {"w": (2, 0, 10), "big": (0, 4, 4)}
    with pytest.raises(ValueError, match=r"2 tensors .* \(after casting to float16\).*'w: 2 NaN, 0 inf of 10'"):
        check.raise_if_any(tmp_path / "c.pt", torch.float16)
    FiniteCheck().raise_if_any(tmp_path / "c.pt")  # nothing found: no error


# --- the output folder ---------------------------------------------------------------------------------------


def test_a_failed_conversion_keeps_the_old_output(tmp_path):
    output = old_output(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_folder(output, overwrite=True) as folder:
            (folder / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in output.iterdir()] == ["old.txt"] and hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])
def test_overwrite_replaces_the_old_output_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(module, "_exchange", lambda a, b: False)
    output = old_output(tmp_path)
    with atomic_output_folder(output, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        assert (output / "old.txt").read_text() == "old"  # in place until the new one is complete
    assert [p.name for p in output.iterdir()] == ["new.txt"] and hidden(tmp_path) == []


def test_the_two_renames_put_the_old_output_back_when_the_second_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(module, "_exchange", lambda a, b: False)
    output = old_output(tmp_path)
    rename = os.rename

    def failing_rename(source, target):
        if Path(source).name.startswith(".out.partial-"):
            raise PermissionError("no")
        rename(source, target)

    monkeypatch.setattr(module.os, "rename", failing_rename)
    with pytest.raises(PermissionError):
        with atomic_output_folder(output, overwrite=True) as folder:
            (folder / "new.txt").write_text("new")
    assert [p.name for p in output.iterdir()] == ["old.txt"] and hidden(tmp_path) == []


def test_an_output_that_is_a_file_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "file.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        with atomic_output_folder(tmp_path / "file.txt", overwrite=True):
            pass
    with pytest.raises(NotADirectoryError, match="cannot be created: .*file.txt' is a file"):
        with atomic_output_folder(tmp_path / "file.txt" / "out"):
            pass
    assert (tmp_path / "file.txt").read_text() == "user data" and hidden(tmp_path) == []


def test_outputs_over_the_inputs_are_refused(tmp_path):
    inputs = tmp_path / "release"
    (inputs / "vae").mkdir(parents=True)
    checkpoint = inputs / "model.pt"
    checkpoint.write_text("weights")
    (tmp_path / "link").symlink_to(inputs)
    for output, message in [
        (inputs, "holds the input"),  # the checkpoint's own folder
        (tmp_path, "holds the input"),  # a folder above it
        (tmp_path / "link", "holds the input"),  # the same folder by another name
        (checkpoint, "is the input"),
        (inputs / "vae", "is the input"),
        (inputs / "vae" / "converted", "lies inside the input folder"),  # an input folder would hold the output
        (tmp_path / "link" / "vae" / "new", "lies inside the input folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            refuse_output_over_inputs(output, [checkpoint, inputs / "vae"])
    refuse_output_over_inputs(tmp_path / "elsewhere", [checkpoint, None])
    refuse_output_over_inputs(tmp_path / "release-converted", [checkpoint, inputs / "vae"])


def test_a_new_folder_beside_the_input_files_is_fine(tmp_path):
    """The README converts where the release files were downloaded: beside them, or deeper in a new folder."""
    inputs = tmp_path / "release"
    inputs.mkdir()
    checkpoint, vocab = inputs / "model.pt", inputs / "bee.txt"
    checkpoint.write_text("weights")
    vocab.write_text("vocab")
    (tmp_path / "link").symlink_to(inputs)
    for output in (inputs / "converted", inputs / "runs" / "converted", tmp_path / "link" / "converted"):
        refuse_output_over_inputs(output, [checkpoint, vocab])
    (inputs / "converted").mkdir()  # an existing folder beside the inputs holds none of them either
    refuse_output_over_inputs(inputs / "converted", [checkpoint, vocab])


def test_leftovers_of_a_running_conversion_are_left_alone(tmp_path, caplog):
    output = tmp_path / "out"
    with atomic_output_folder(output) as first:
        (first / "a.txt").write_text("a")
        with caplog.at_level(logging.WARNING, logger="viscpm_hf.convert"):
            notes = clean_leftovers(output)
        assert first.is_dir() and (first / "a.txt").is_file()
        assert notes == [f"{first} belongs to a conversion still running (process {os.getpid()}); left in place"]
        assert notes[0] in caplog.text
    assert (output / "a.txt").is_file() and hidden(tmp_path) == []


def test_leftovers_whose_process_may_live_are_named_not_removed(tmp_path):
    alive = tmp_path / f".out.partial-{os.getppid()}"  # an unlocked folder of a live process (the test's parent)
    alive.mkdir()
    notes = clean_leftovers(tmp_path / "out")
    assert alive.is_dir() and notes == [f"{alive} may belong to the running process {os.getppid()}; left in place: remove it if it is not"]


# --- killed conversions ------------------------------------------------------------------------------------

# The child loads checkpoint.py alone (torch only, no viscpm_hf import) so that each kill costs a second or two,
# and pauses at a chosen instant until it is killed.
CHILD = textwrap.dedent(
    """
    import importlib.util, os, pathlib, sys, time

    spec = importlib.util.spec_from_file_location("checkpoint_under_test", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output, instant = pathlib.Path(sys.argv[2]), sys.argv[3]

    def pause():
        print("paused", flush=True)
        time.sleep(60)

    if instant == "after-exchange":
        remove = module._remove
        module._remove = lambda path: (pause(), remove(path))
    if instant == "between-renames":
        module._exchange = lambda a, b: False
        rename = os.rename

        def rename_then_pause(source, target):
            rename(source, target)
            if ".previous-" in pathlib.Path(target).name:
                pause()

        os.rename = rename_then_pause
    with module.atomic_output_folder(output, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        if instant == "writing":
            pause()
    """
)


def kill_at(instant: str, output: Path) -> int:
    """Runs an overwrite of `output` in a child, SIGKILLs it at `instant`; returns its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, module.__file__, str(output), instant], stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready and child.stdout.readline() == "paused\n", f"the child did not reach {instant!r}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=20) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=20)
        child.stdout.close()
    return child.pid


def test_killed_while_writing_the_old_output_stays_and_the_next_run_removes_the_partial(tmp_path, caplog):
    output = old_output(tmp_path)
    pid = kill_at("writing", output)
    assert (output / "old.txt").read_text() == "old" and hidden(tmp_path) == [f".out.partial-{pid}"]
    with caplog.at_level(logging.WARNING, logger="viscpm_hf.convert"):
        with atomic_output_folder(output, overwrite=True) as folder:
            (folder / "again.txt").write_text("again")
    assert [p.name for p in output.iterdir()] == ["again.txt"] and hidden(tmp_path) == []
    assert f"removed .out.partial-{pid}, left by a conversion that did not finish (process {pid})" in caplog.text


def test_killed_after_the_exchange_the_new_output_is_complete_and_the_old_is_removed_next(tmp_path):
    output = old_output(tmp_path)
    pid = kill_at("after-exchange", output)
    assert [p.name for p in output.iterdir()] == ["new.txt"]  # the new output is in place, whole
    assert hidden(tmp_path) == [f".out.partial-{pid}"] and (tmp_path / f".out.partial-{pid}" / "old.txt").is_file()
    assert clean_leftovers(output) == [f"removed .out.partial-{pid}, left by a conversion that did not finish (process {pid})"]
    assert [p.name for p in output.iterdir()] == ["new.txt"] and hidden(tmp_path) == []


def test_killed_between_the_two_renames_the_next_run_restores_the_old_output(tmp_path):
    output = old_output(tmp_path)
    pid = kill_at("between-renames", output)
    assert not output.exists() and (tmp_path / f".out.previous-{pid}" / "old.txt").is_file()
    assert hidden(tmp_path) == [f".out.partial-{pid}", f".out.previous-{pid}"]
    # The next run puts the old output back first, so that it is protected as any existing output is.
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_output_folder(output):
            pass
    assert [p.name for p in output.iterdir()] == ["old.txt"] and hidden(tmp_path) == []


def test_a_path_that_only_spells_its_way_through_an_input_folder_is_fine(tmp_path):
    (tmp_path / "vae").mkdir()
    refuse_output_over_inputs(tmp_path / "vae" / ".." / "pipeline", [tmp_path / "vae"])
    with pytest.raises(ValueError, match="lies inside the input folder"):
        refuse_output_over_inputs(tmp_path / "other" / ".." / "vae" / "pipeline", [tmp_path / "vae"])
