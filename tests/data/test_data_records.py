import json
import re

import pytest

from ptjax.data import (
    ChatRecord,
    DataError,
    PreferenceRecord,
    SFTRecord,
    read_preference_jsonl,
    read_sft_jsonl,
    write_jsonl,
)

GOOD_SFT = '{"prompt": "p", "completion": "c"}'


def _chat(*messages):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})


# (file lines, expected line number or None for whole-file errors, expected text in the message)
SFT_ERRORS = {
    "bad_json": ([GOOD_SFT, '{"prompt": "p", '], 2, "invalid JSON ("),
    "missing_field": ([GOOD_SFT, "", '{"completion": "c"}'], 3, "missing field 'prompt'"),
    "missing_both": ([GOOD_SFT, '{"id": 3}'], 2, "missing field 'prompt'"),
    "missing_completion": (['{"prompt": "p"}'], 1, "missing field 'completion'"),
    "wrong_type": (
        [GOOD_SFT, GOOD_SFT, '{"prompt": "p", "completion": 5}'],
        3,
        "field 'completion': expected a string, got int",
    ),
    "nested_wrong_type": (
        [GOOD_SFT, '{"messages": [{"role": "user", "content": "hi"}, '
                   '{"role": "assistant", "content": 3}]}'],
        2,
        "field 'messages[1].content': expected a string, got int",
    ),
    "bad_role": (
        ['{"messages": [{"role": "bot", "content": "x"}]}'],
        1,
        "field 'messages[0].role': unknown role 'bot'",
    ),
    "missing_role": (
        [GOOD_SFT, '{"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}'],
        2,
        "missing field 'messages[1].role'",
    ),
    "message_not_object": (
        ['{"messages": ["hi"]}'],
        1,
        "field 'messages[0]': expected a JSON object, got str",
    ),
    "messages_not_list": (
        ['{"messages": {"role": "user"}}'],
        1,
        "field 'messages': expected a list, got object",
    ),
    "no_assistant": (
        [GOOD_SFT, "", "", _chat(("user", "hi"))],
        4,
        "field 'messages': no assistant",
    ),
    "not_an_object": ([GOOD_SFT, "[1, 2]"], 2, "expected a JSON object, got list"),
    "null_record": (["null"], 1, "expected a JSON object, got null"),
    "empty_file": ([], None, "file is empty (no records)"),
    "blank_lines_only": (["", "   ", "\t"], None, "file is empty (no records)"),
}


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _check_error(error: DataError, path, line, text):
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(error).startswith(prefix), str(error)
    assert text in str(error), str(error)
    assert error.line == line
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("case", sorted(SFT_ERRORS))
def test_sft_reader_errors_name_path_line_and_field(tmp_path, case):
    lines, line, text = SFT_ERRORS[case]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    _write_lines(path, lines)
    with pytest.raises(DataError) as info:
        read_sft_jsonl(path)
    _check_error(info.value, path, line, text)


def test_exact_messages(tmp_path):
    path = tmp_path / "train.jsonl"
    _write_lines(path, [GOOD_SFT] * 16 + ['{"prompt": "p", "completion": 7}'])
    with pytest.raises(DataError) as info:
        read_sft_jsonl(path)
    assert str(info.value) == f"{path}:17: field 'completion': expected a string, got int"
    path.write_text("")
    with pytest.raises(DataError) as info:
        read_sft_jsonl(path)
    assert str(info.value) == f"{path}: file is empty (no records)"


PREFERENCE_ERRORS = {
    "missing_rejected": (['{"prompt": "p", "chosen": "a"}'], 1, "missing field 'rejected'"),
    "wrong_type": (
        [
            '{"prompt": "p", "chosen": "a", "rejected": "b"}',
            '{"prompt": "p", "chosen": ["a"], "rejected": "b"}',
        ],
        2,
        "field 'chosen[0]': expected a JSON object, got str",
    ),
    "bad_json": (["", "{oops}"], 2, "invalid JSON ("),
    "empty_file": ([""], None, "file is empty (no records)"),
    "number_response": (['{"prompt": "p", "chosen": 3, "rejected": "b"}'], 1,
                        "field 'chosen': expected a string or a list of messages, got int"),
    "bad_role": (['{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}'],
                 1, "field 'prompt[0].role': unknown role 'bot'"),
    "no_assistant": (['{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], '
                      '"rejected": "b"}'], 1, "field 'chosen': no assistant message"),
}


@pytest.mark.parametrize("case", sorted(PREFERENCE_ERRORS))
def test_preference_reader_errors(tmp_path, case):
    lines, line, text = PREFERENCE_ERRORS[case]
    path = tmp_path / "prefs.jsonl"
    _write_lines(path, lines)
    with pytest.raises(DataError) as info:
        read_preference_jsonl(path)
    _check_error(info.value, path, line, text)


def test_missing_file_and_bad_utf8(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="^" + re.escape(f"{missing}: file not found")):
        read_sft_jsonl(missing)
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(GOOD_SFT.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError) as info:
        read_sft_jsonl(path)
    _check_error(info.value, path, 2, "not valid UTF-8")


def test_sft_reader_reads_both_kinds_and_ignores_extra_fields(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(
        path,
        [
            {"prompt": "2+2=", "completion": "4", "id": 1, "source": "x"},
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "héllo"},
                    {"role": "assistant", "content": "hi ✓", "weight": 1},
                ]
            },
        ],
    )
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert "✓" in path.read_text(encoding="utf-8")  # written readable, not \u-escaped
    records = read_sft_jsonl(path)
    assert records == [
        SFTRecord(prompt="2+2=", completion="4"),
        ChatRecord(messages=(("system", "be brief"), ("user", "héllo"), ("assistant", "hi ✓"))),
    ]


def test_preference_reader(tmp_path):
    path = tmp_path / "sub" / "prefs.jsonl"
    write_jsonl(path, [{"prompt": "p", "chosen": "a", "rejected": "b", "score": 3},
                       {"prompt": "q", "chosen": "same", "rejected": "same"}])
    assert read_preference_jsonl(path) == [
        PreferenceRecord("p", "a", "b"),
        PreferenceRecord("q", "same", "same"),
    ]


def test_preference_reader_chat_form(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [{"prompt": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "2+2?"}],
                        "chosen": [{"role": "assistant", "content": "4"}],
                        "rejected": "5"}])
    (record,) = read_preference_jsonl(path)
    assert record.is_chat
    assert record.as_sft("chosen") == ChatRecord(
        messages=(("system", "be brief"), ("user", "2+2?"), ("assistant", "4")))
    assert record.as_sft("rejected") == ChatRecord(
        messages=(("system", "be brief"), ("user", "2+2?"), ("assistant", "5")))
    plain = PreferenceRecord("p", "a", "b")
    assert not plain.is_chat and plain.as_sft("rejected") == SFTRecord("p", "b")
