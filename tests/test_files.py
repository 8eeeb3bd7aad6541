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
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
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
])
def test_foreign_content_is_named(tmp_path, content, cause):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(LatentError, match=cause):
        load_latent_file(str(path))
    with pytest.raises(TextEmbeddingError, match=cause):
        load_text_embedding(path)


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
