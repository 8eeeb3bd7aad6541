"""Reading user files: latent files with what travels with them, precomputed text embeddings; tensors only."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pid_core.errors import LatentError, TextEmbeddingError
from pid_core.files import load_latent_file, load_text_embedding

# What the readers say about a damaged file (safetensors, torch.load, numpy, the OS): never in our messages.
LIBRARY_WORDS = re.compile(r"miniz|PytorchStreamReader|deserializ|incomplete metadata|EOF|Errno|central directory|"
                           r"could only read|not fully written|RuntimeError|OSError|ValueError", re.IGNORECASE)


def test_latent_file_and_its_sigma(tmp_path):
    latent = torch.randn(2, 16, 3, 4)
    save_file({"latent": latent, "pid_sigma": torch.tensor([0.2, 0.4])}, tmp_path / "l.safetensors")
    got, meta = load_latent_file(str(tmp_path / "l.safetensors"))
    assert torch.equal(got, latent) and meta.sigma.tolist() == pytest.approx([0.2, 0.4])
    assert meta.source == "the latent file l.safetensors"
    save_file({"latent_tensor": latent}, tmp_path / "c.latent")  # ComfyUI's Save Latent
    got, meta = load_latent_file(str(tmp_path / "c.latent"))
    assert torch.equal(got, latent) and meta.sigma is None
    np.save(tmp_path / "n.npy", latent.numpy())
    assert torch.equal(load_latent_file(str(tmp_path / "n.npy"))[0], latent)
    with pytest.raises(LatentError, match="not found"):
        load_latent_file(str(tmp_path / "missing.safetensors"))
    save_file({"a": latent, "b": latent.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(LatentError, match="one latent tensor"):
        load_latent_file(str(tmp_path / "two.safetensors"))


class _NotATensor:  # pickled by torch.save; weights_only loading must refuse it
    pass


def test_load_text_embedding_round_trips(tmp_path):
    emb = torch.randn(1, 300, 32)
    save_file({"anything": emb}, tmp_path / "a.safetensors")
    assert torch.equal(load_text_embedding(tmp_path / "a.safetensors"), emb)
    save_file({"text_embedding": emb, "mask": torch.ones(1, 300)}, tmp_path / "b.safetensors")
    assert torch.equal(load_text_embedding(tmp_path / "b.safetensors"), emb)
    np.save(tmp_path / "c.npy", emb.numpy())
    assert torch.equal(load_text_embedding(tmp_path / "c.npy"), emb)
    torch.save(emb, tmp_path / "d.pt")
    assert torch.equal(load_text_embedding(tmp_path / "d.pt"), emb)
    torch.save({"text_embedding": emb}, tmp_path / "e.pth")
    assert torch.equal(load_text_embedding(tmp_path / "e.pth"), emb)


def test_load_text_embedding_errors(tmp_path):
    torch.save({"text_embedding": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(TextEmbeddingError, match="pickled"):
        load_text_embedding(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([_NotATensor()], dtype=object), allow_pickle=True)
    with pytest.raises(TextEmbeddingError):
        load_text_embedding(tmp_path / "obj.npy")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.safetensors")
    with pytest.raises(TextEmbeddingError, match="text_embedding"):
        load_text_embedding(tmp_path / "two.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02not a safetensors file")
    with pytest.raises(TextEmbeddingError, match="not a text embedding file.*neither safetensors"):
        load_text_embedding(tmp_path / "junk.safetensors")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(TextEmbeddingError, match="not a text embedding file"):
        load_text_embedding(tmp_path / "x.txt")
    with pytest.raises(TextEmbeddingError, match="not found"):
        load_text_embedding(tmp_path / "missing.pt")
    with pytest.raises(TextEmbeddingError, match="is a folder"):
        load_text_embedding(tmp_path)


def _write_each_kind(tmp_path, tensor):
    """The same tensor in every kind of file we read, each under a misleading name."""
    made = {}
    save_file({"latent": tensor}, tmp_path / "safetensors.pth")
    made["safetensors"] = tmp_path / "safetensors.pth"
    save_file({"latent": tensor}, tmp_path / "no_extension")
    made["no extension"] = tmp_path / "no_extension"
    torch.save({"latent": tensor}, tmp_path / "torch.safetensors")
    made["torch zip"] = tmp_path / "torch.safetensors"
    torch.save({"latent": tensor}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    made["torch legacy"] = tmp_path / "legacy.bin"
    with open(tmp_path / "array.safetensors", "wb") as f:
        np.save(f, tensor.numpy())
    made["numpy"] = tmp_path / "array.safetensors"
    with open(tmp_path / "archive.pt", "wb") as f:
        np.savez(f, latent=tensor.numpy())
    made["numpy archive"] = tmp_path / "archive.pt"
    return made


def test_files_are_read_by_content_not_by_name(tmp_path):
    latent = torch.randn(1, 16, 3, 4)
    for kind, path in _write_each_kind(tmp_path, latent).items():
        assert torch.equal(load_latent_file(str(path))[0], latent), kind
        assert torch.equal(load_text_embedding(path), latent), kind


@pytest.mark.parametrize("content,cause", [
    (b"", "empty"),
    (b"GGUF\x03\x00\x00\x00" + bytes(40), "GGUF"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>", "web page"),
    (b"\x00\x01 random bytes of no kind", "neither safetensors, PyTorch nor numpy"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(20), "is a PNG image, not a"),  # an image for a latent
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(20), "is a JPEG image, not a"),
    ("a red fox in snow, at dusk\n".encode(), "is a text file (it starts with 'a red fox in snow"),  # a prompt
])
def test_foreign_content_is_named(tmp_path, content, cause):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(LatentError, match=re.escape(cause)) as latent:
        load_latent_file(str(path))
    with pytest.raises(TextEmbeddingError, match=re.escape(cause)) as text:
        load_text_embedding(path)
    if "image" in cause:
        assert "encode the image with its model's VAE" in str(latent.value)
    if "text file" in cause:
        assert "A prompt is encoded by the Gemma-2-2b-it text encoder" in str(text.value)


def test_refusals_never_advise_unsafe_loading(tmp_path):
    torch.save({"latent": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(LatentError) as err:
        load_latent_file(str(tmp_path / "evil.pt"))
    assert "pickled Python objects" in str(err.value) and "weights_only" not in str(err.value)
    np.save(tmp_path / "obj.npy", np.array([_NotATensor()], dtype=object), allow_pickle=True)
    with pytest.raises(LatentError) as err:
        load_latent_file(str(tmp_path / "obj.npy"))
    assert "Python objects" in str(err.value) and "allow_pickle" not in str(err.value)
    np.save(tmp_path / "words.npy", np.array(["a fox", "snow"]))
    with pytest.raises(TextEmbeddingError, match="not real numbers"):
        load_text_embedding(tmp_path / "words.npy")


@pytest.mark.parametrize("keep", [0.5, 0.99, -1], ids=["half", "most", "all but a byte"])
def test_truncated_files_are_called_truncated(tmp_path, keep):
    """A file cut short, of any kind, is named truncated in our words: the readers' own text ("incomplete
    metadata", "PytorchStreamReader", "internal miniz error", "unexpected EOF") stays out of the message."""
    for kind, path in _write_each_kind(tmp_path, torch.randn(1, 16, 30, 40)).items():
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep) if keep > 0 else keep])
        with pytest.raises(LatentError, match=f"^{path.name} is truncated .*: download or save it again.$") as e:
            load_latent_file(str(path))
        assert not LIBRARY_WORDS.search(str(e.value)), (kind, str(e.value))


def test_a_damaged_safetensors_file_is_named_in_our_words(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file({"latent": torch.randn(1, 16, 3, 4)}, path)
    data = bytearray(path.read_bytes())
    path.write_bytes(data + b"tail")
    with pytest.raises(LatentError, match=r"^l.safetensors is damaged \(4 bytes follow the tensors its header lists\)"):
        load_latent_file(str(path))
    data[10:14] = b"\x00\x00\x00\x00"  # inside the JSON header
    path.write_bytes(data)
    with pytest.raises(LatentError, match=r"^l.safetensors is damaged \(its safetensors header does not read"):
        load_latent_file(str(path))


def test_a_reader_failure_we_cannot_name_puts_its_words_after_ours(tmp_path, monkeypatch):
    """The one rule for library text (docs/DESIGN.md §13): our sentence first; the reader's first line after
    it only when the file's structure does not tell the cause."""
    import safetensors.torch

    path = tmp_path / "l.safetensors"
    save_file({"latent": torch.randn(1, 16, 3, 4)}, path)

    def fails(*args, **kwargs):
        raise RuntimeError("a reader's own words\nand a second line")

    monkeypatch.setattr(safetensors.torch, "load_file", fails)
    with pytest.raises(LatentError) as e:
        load_latent_file(str(path))
    assert str(e.value) == ("l.safetensors could not be read as safetensors, so it is damaged or not such a file: "
                            "download or save it again (RuntimeError: a reader's own words).")


def _pickles(tmp_path):
    """Files that PyTorch's safe loader cannot read: a plain pickle.dump (protocol 4 and 2), and torch.save
    with pickle protocol 4 (zip and legacy), which makes torch warn "Detected pickle protocol 4" first."""
    import pickle

    tensors = {"latent": torch.randn(1, 16, 3, 4)}
    made = {}
    for protocol in (4, 2):
        made[f"raw{protocol}"] = tmp_path / f"raw{protocol}.pt"
        with open(made[f"raw{protocol}"], "wb") as f:
            pickle.dump(tensors, f, protocol=protocol)
    made["zip4"] = tmp_path / "zip4.pt"
    torch.save(tensors, made["zip4"], pickle_protocol=4)
    made["legacy4"] = tmp_path / "legacy4.pt"
    torch.save(tensors, made["legacy4"], pickle_protocol=4, _use_new_zipfile_serialization=False)
    return made


def test_pickles_the_safe_loader_cannot_read_are_named_without_warnings(tmp_path, caplog):
    import logging
    import warnings

    made = _pickles(tmp_path)
    for kind, path in made.items():
        with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.DEBUG, logger="pid_core"):
            warnings.simplefilter("always")
            with pytest.raises(LatentError) as err:
                load_latent_file(str(path))
        assert not shown, (kind, [str(w.message) for w in shown])  # nothing ahead of the one-line error
        message = str(err.value)
        assert "weights_only" not in message and "truncated" not in message, (kind, message)
        if kind.startswith("raw"):
            assert "plain Python pickle (pickle.dump)" in message, message
        else:
            assert "pickle protocol" in message and "safe loader" in message, message
            assert "Detected pickle protocol 4" in caplog.text  # kept for --verbose


def test_other_zips_and_checkpoints_given_as_latents_or_text_are_named(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "download.zip", "w") as archive:
        archive.writestr("pid/model.safetensors", b"not here")
    with pytest.raises(LatentError, match=r"download.zip is a zip archive \(pid/model.safetensors\), not a latent file"):
        load_latent_file(str(tmp_path / "download.zip"))
    weights = {f"blocks.{i}.weight": torch.randn(2, 2) for i in range(9)} | {"blocks.0.bias": torch.zeros(2)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(LatentError) as err:
        load_latent_file(str(tmp_path / "model.safetensors"))
    message = str(err.value)
    assert "holds a model's weights" in message and "(10 in all)" in message and len(message) < 300, message
    with pytest.raises(TextEmbeddingError, match="model.safetensors holds a model's weights \\(10 tensors\\), not a text"):
        load_text_embedding(tmp_path / "model.safetensors")
