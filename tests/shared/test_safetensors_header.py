"""validate_safetensors_header against real files and hand-crafted hostile headers."""
import json
import struct

import pytest

from shared.fetch import FetchError, validate_config, validate_safetensors_header


def write(path, header, data=b"", header_len=None, raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def tensor(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def invalid(path, max_tensors=100) -> str:
    with pytest.raises(FetchError) as info:
        validate_safetensors_header(path, max_tensors)
    assert info.value.code == "safetensors_invalid"
    assert path.name in info.value.message
    return info.value.message


# --- files the safetensors library writes are accepted --------------------------------

def test_files_written_by_safetensors_pass(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.zeros(5, dtype=torch.float16),
        "bf16": torch.zeros(2, 2, dtype=torch.bfloat16), "f64": torch.zeros(1, dtype=torch.float64),
        "i64": torch.arange(3), "i8": torch.zeros(7, dtype=torch.int8), "u8": torch.zeros(1, dtype=torch.uint8),
        "bool": torch.ones(3, dtype=torch.bool), "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
        "f8b": torch.zeros(4, dtype=torch.float8_e5m2), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 8),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = validate_safetensors_header(path, max_tensors=len(tensors))
    assert set(header) - {"__metadata__"} == set(tensors)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["bf16"]["dtype"] == "BF16" and header["f8"]["dtype"] == "F8_E4M3"


def test_hand_written_valid_file(tmp_path):
    header = {"a": tensor("F32", [2], 0, 8), "b": tensor("I16", [3, 1], 8, 14)}
    assert validate_safetensors_header(write(tmp_path / "v.safetensors", header, b"\0" * 14), 10) == header


# --- hostile or broken headers --------------------------------------------------------

def test_file_shorter_than_the_length_field(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert "too short" in invalid(path)


def test_truncated_file(tmp_path):
    header = {"a": tensor("F32", [4], 0, 16)}
    path = write(tmp_path / "t.safetensors", header, b"\0" * 16)
    path.write_bytes(path.read_bytes()[:-5])
    assert "outside" in invalid(path)


def test_header_length_larger_than_the_file(tmp_path):
    path = write(tmp_path / "h.safetensors", {}, header_len=10_000)
    assert "truncated" in invalid(path)


def test_header_length_over_the_global_limit(tmp_path):
    path = write(tmp_path / "huge.safetensors", {}, header_len=2**63)
    assert "limit" in invalid(path)


def test_offsets_beyond_the_data_section(tmp_path):
    path = write(tmp_path / "o.safetensors", {"a": tensor("F32", [1024], 0, 4096)}, b"\0" * 16)
    assert "outside the 16-byte data section" in invalid(path)


def test_overlapping_offsets(tmp_path):
    header = {"a": tensor("F32", [2], 0, 8), "b": tensor("F32", [2], 4, 12)}
    path = write(tmp_path / "ov.safetensors", header, b"\0" * 12)
    assert "overlaps" in invalid(path)


def test_aliased_tensors(tmp_path):
    header = {"a": tensor("F32", [2], 0, 8), "b": tensor("F32", [2], 0, 8)}
    path = write(tmp_path / "alias.safetensors", header, b"\0" * 8)
    assert "overlaps" in invalid(path)


def test_hole_between_tensors(tmp_path):
    header = {"a": tensor("F32", [1], 0, 4), "b": tensor("F32", [1], 8, 12)}
    path = write(tmp_path / "hole.safetensors", header, b"\0" * 12)
    assert "belong to no tensor" in invalid(path)


def test_trailing_bytes_after_the_last_tensor(tmp_path):
    path = write(tmp_path / "tail.safetensors", {"a": tensor("F32", [1], 0, 4)}, b"\0" * 4 + b"polyglot")
    assert "cover only 4" in invalid(path)


def test_span_inconsistent_with_dtype_and_shape(tmp_path):
    path = write(tmp_path / "span.safetensors", {"a": tensor("F32", [3], 0, 8)}, b"\0" * 8)
    assert "needs 12 bytes" in invalid(path)


def test_reversed_offsets(tmp_path):
    path = write(tmp_path / "rev.safetensors", {"a": tensor("U8", [0], 8, 0)}, b"\0" * 8)
    assert "outside" in invalid(path)


@pytest.mark.parametrize("dtype", ["F4", "C64", "OBJECT", "f32", 4, None])
def test_bad_dtype(tmp_path, dtype):
    path = write(tmp_path / "d.safetensors", {"a": tensor(dtype, [1], 0, 4)}, b"\0" * 4)
    assert "dtype" in invalid(path)


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], ["2"], "2", [1] * 17, None])
def test_bad_shape(tmp_path, shape):
    path = write(tmp_path / "s.safetensors", {"a": tensor("U8", shape, 0, 1)}, b"\0")
    assert "shape" in invalid(path)


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], [-1, 0], [0.0, 1.0], [False, True], "0,1", None])
def test_bad_data_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}
    path = write(tmp_path / "off.safetensors", header, b"\0")
    assert "data_offsets" in invalid(path)


def test_too_many_tensors(tmp_path):
    header = {f"t{i}": tensor("U8", [1], i, i + 1) for i in range(11)}
    path = write(tmp_path / "many.safetensors", header, b"\0" * 11)
    assert validate_safetensors_header(path, max_tensors=11)
    assert "11 tensors; the limit is 10" in invalid(path, max_tensors=10)


@pytest.mark.parametrize("raw, why", [
    (b"not json at all", "not valid JSON"),
    (b"\xff\xfe\x00{}", "not valid JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"a": 1}', "must be an object"),
    (b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, '
     b'"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', "duplicate"),
    (b'{"__metadata__": {"k": 1}}', "__metadata__"),
    (b"[" * 100_000, "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_malformed_header_json(tmp_path, raw, why):
    path = write(tmp_path / "j.safetensors", None, raw_header=raw)
    assert why in invalid(path)


# --- config.json ----------------------------------------------------------------------

@pytest.mark.parametrize("body, ok", [(b'{"model_type": "gpt2"}', True), (b"[]", False), (b"nul", False),
                                      (b'"string"', False), (b"{" + b'"a":' * 5 + b"1", False)])
def test_config_json(tmp_path, body, ok):
    path = tmp_path / "config.json"
    path.write_bytes(body)
    if ok:
        assert validate_config(path) == {"model_type": "gpt2"}
    else:
        with pytest.raises(FetchError) as info:
            validate_config(path)
        assert info.value.code == "config_invalid"
