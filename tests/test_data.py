"""Prompt sources and the resumable prompt order."""

import json

import pytest

from distar.data import PromptError, PromptSampler, load_prompts


def test_text_csv_and_json_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red circle\n2,a blue square\n")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a red circle"}, {"prompt": "a blue square"}]))
    (tmp_path / "q.json").write_text(json.dumps({"prompts": ["a red circle", "a blue square"]}))
    for name in ("p.txt", "p.csv", "p.json", "q.json"):
        assert load_prompts(str(tmp_path / name)) == ["a red circle", "a blue square"], name


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "is not a readable file"),
        ("empty.txt", "\n  \n", "holds no prompts"),
        ("bad.csv", "id,text\n1,x\n", "no `prompt` column"),
        ("bad.json", "{not json", "not valid JSON"),
        ("nums.json", "[1, 2]", "string prompt"),
        ("shape.json", '{"other": 1}', "expected a list"),
        ("binary.txt", b"\xff\xfe\x00", "cannot read"),
    ],
)
def test_bad_sources_name_the_field(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PromptError, match=message) as err:
        load_prompts(str(path))
    assert err.value.message.startswith("data.prompts: ") and str(err.value).startswith("error: data.prompts: ")


def test_sampler_is_a_pure_function_of_seed_and_step():
    prompts = [f"p{i}" for i in range(7)]
    a, b = PromptSampler(prompts, 3, seed=5), PromptSampler(prompts, 3, seed=5)
    first = [a.batch(k) for k in range(10)]
    assert [b.batch(k) for k in reversed(range(10))][::-1] == first  # order of calls is irrelevant
    assert PromptSampler(prompts, 3, seed=6).batch(0) != first[0] or PromptSampler(prompts, 3, seed=6).batch(1) != first[1]
    flat = [p for batch in first for p in batch]
    for epoch in range(4):  # every epoch is a permutation: each prompt once
        assert sorted(flat[epoch * 7 : (epoch + 1) * 7]) == sorted(prompts)
