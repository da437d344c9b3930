"""viscpm_hf.hub: cards written with ModelCardData, and uploads refused unless the folder is Hub-clean."""

import pickle
import zipfile

import pytest
import torch
from fake_hub import FakeHub
from huggingface_hub import EvalResult, ModelCardData
from safetensors.torch import save_file

from viscpm_hf import hub


METADATA = {
    "library_name": "transformers", "pipeline_tag": "image-text-to-text", "license": "apache-2.0",
    "language": ["en", "zh"], "base_model": "org/base", "tags": ["viscpm", "mpm"],
}  # fmt: skip


def model_folder(root, **overrides):
    """A small Hub-clean folder: safetensors weights, a config, a card, and a sub-folder."""
    folder = root / "model"
    (folder / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "unet" / "config.json").write_text("{}")
    hub.write_card(folder / "README.md", ModelCardData(**{**METADATA, **overrides}), "# A model\n")
    return folder


def test_a_written_card_loads_with_its_metadata_and_results(tmp_path):
    results = [EvalResult(task_type="text-to-image", dataset_type="openmoji", dataset_name="OpenMoji", dataset_config="zh",
                          metric_type="fid", metric_value=150.4)]  # fmt: skip
    data = ModelCardData(**METADATA, model_name="m", eval_results=results)
    hub.write_card(tmp_path / "README.md", data, "\n# Title\n\nText.\n")
    card = hub.load_card(tmp_path / "README.md")
    assert card.data.base_model == "org/base" and card.data.language == ["en", "zh"]
    assert card.data.eval_results[0].metric_value == 150.4 and card.data.eval_results[0].dataset_config == "zh"
    assert card.text == "\n# Title\n\nText.\n" and "model-index:" in card.content
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # the temporary file was renamed


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("# A card without a header\n", "lacks library_name, pipeline_tag, license, language, base_model, tags"),
        ("---\nlicense: mit\n---\n# Some\n", "lacks library_name, pipeline_tag, language, base_model, tags"),
        ("---\nlicense: [mit\n---\n# Broken\n", "does not parse"),
        ("---\n- a list\n---\n# Not a mapping\n", "does not parse"),
    ],
)
def test_a_missing_or_incomplete_card_is_refused_naming_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "README.md").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        hub.load_card(tmp_path / "README.md")
    assert str(tmp_path / "README.md") in str(error.value)


def test_the_upload_lists_every_file_but_hidden_ones(tmp_path):
    folder = model_folder(tmp_path)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.lock").write_text("")
    (folder / ".README.md.partial").write_text("")
    assert hub.files_to_upload(folder) == ["README.md", "config.json", "model.safetensors", "unet/config.json"]


def torch_save(path):
    torch.save({"w": torch.zeros(2)}, path)


def raw_pickle(path):
    path.write_bytes(pickle.dumps({"w": [0.0]}, protocol=4))


@pytest.mark.parametrize(
    "name, write",
    [
        ("pytorch_model.bin", torch_save),
        ("unet/optimizer.pt", torch_save),
        ("training_args.bin", raw_pickle),
        ("scheduler.pkl", raw_pickle),
        ("weights", torch_save),  # torch.save's zip, whatever the name
        ("state.data", raw_pickle),  # a pickle stream, whatever the name
    ],
)
def test_pickled_files_are_refused_by_name_or_content(tmp_path, name, write, monkeypatch):
    hub_calls = FakeHub(monkeypatch)
    folder = model_folder(tmp_path)
    write(folder / name)
    with pytest.raises(ValueError, match="pickled files") as error:
        hub.push_to_hub(folder, "user/model")
    assert name in str(error.value) and "safetensors" in str(error.value)
    assert hub_calls.repos == [] and hub_calls.commits == []  # nothing reached the Hub


def test_zip_files_without_pickles_and_safetensors_whose_header_looks_like_one_pass(tmp_path):
    folder = model_folder(tmp_path)
    with zipfile.ZipFile(folder / "images.zip", "w") as archive:
        archive.writestr("0.png", b"\x89PNG")
    save_file({"a" * 580: torch.zeros(1)}, str(folder / "odd.safetensors"))  # a 640-byte header: 80 02 00 ...
    assert (folder / "odd.safetensors").read_bytes()[:2] == pickle.dumps(None, protocol=2)[:2]
    assert {"odd.safetensors", "images.zip"} <= set(hub.files_to_upload(folder))


def test_an_upload_without_a_complete_card_is_refused_before_the_hub(tmp_path, monkeypatch):
    hub_calls = FakeHub(monkeypatch)
    folder = model_folder(tmp_path, base_model=None)
    with pytest.raises(ValueError, match="lacks base_model"):
        hub.push_to_hub(folder, "user/model")
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match="No model card"):
        hub.push_to_hub(folder, "user/model")
    with pytest.raises(ValueError, match="is not a folder"):
        hub.push_to_hub(folder / "config.json", "user/model")
    assert hub_calls.repos == [] and hub_calls.commits == []


def test_push_creates_the_repo_and_uploads_the_checked_files_in_one_commit(tmp_path, monkeypatch):
    hub_calls = FakeHub(monkeypatch)
    folder = model_folder(tmp_path)
    commit = hub.push_to_hub(folder, "model", token="hf_secret", private=True, commit_message="first upload")
    assert hub_calls.repos == [{"repo_id": "model", "token": "hf_secret", "private": True, "exist_ok": True}]
    # A repo name without a namespace lands under the token's user: the commit goes to the repo create_repo made.
    assert hub_calls.commit["repo_id"] == "user/model" and hub_calls.commit["message"] == "first upload"
    assert hub_calls.commit["files"] == {name: (folder / name).read_bytes() for name in hub.files_to_upload(folder)}
    assert commit.repo_url.repo_id == "user/model" and commit.oid == f"{1:040x}"


def test_the_hub_target_is_checked_before_any_work(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="hf auth login"):
        hub.check_hub_target("user/model")
    hub.check_hub_target("user/model", token="hf_secret")
    with pytest.raises(ValueError, match="Repo id must"):
        hub.check_hub_target("user/model/extra", token="hf_secret")
    with pytest.raises(ValueError, match="would lack its license, language: .* pass --license / --language"):
        hub.check_hub_target("user/model", token="hf_secret", derived={"base_model": "org/base"})


def test_a_derived_model_inherits_base_model_licence_and_languages_unless_given(tmp_path):
    folder = model_folder(tmp_path, license="other", license_name="general-model-license", license_link="https://x")
    inherited = {"base_model": "org/base", "license": "other", "license_name": "general-model-license",
                 "license_link": "https://x", "language": ["en", "zh"]}  # fmt: skip
    assert hub.derived_metadata(str(folder)) == inherited
    # A licence of its own drops the inherited one's name and link.
    assert hub.derived_metadata(str(folder), license="mit", language=["de"], base_model="org/other") == {
        "base_model": "org/other", "license": "mit", "language": ["de"]
    }  # fmt: skip
    (folder / "README.md").unlink()
    assert hub.derived_metadata(str(folder)) == {}
    # A Hub id is its own base model; offline its card is out of reach, so that is all.
    assert hub.derived_metadata("org/some-model") == {"base_model": "org/some-model"}
