import json

import pytest

from alpaca.core.prompter import Prompter, available_templates

STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSum the numbers.\n\n### Input:\n2 and 3\n\n### Response:"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a color.\n\n### Response:"
)
EXPECTED = {
    "alpaca": (STANFORD_INPUT + "\n", STANFORD_NO_INPUT + "\n"),
    "alpaca_legacy": (STANFORD_INPUT, STANFORD_NO_INPUT),
    "alpaca_short": (
        "### Instruction:\nSum the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "### Instruction:\nName a color.\n\n### Response:\n",
    ),
    "vigogne": (
        "Ci-dessous se trouve une instruction qui décrit une tâche, associée à une entrée qui fournit un "
        "contexte supplémentaire. Écrivez une réponse qui complète correctement la demande.\n\n"
        "### Instruction:\nSum the numbers.\n\n### Entrée:\n2 and 3\n\n### Réponse:\n",
        "Ci-dessous se trouve une instruction qui décrit une tâche. Écrivez une réponse qui complète "
        "correctement la demande.\n\n### Instruction:\nName a color.\n\n### Réponse:\n",
    ),
}


def test_shipped_templates():
    assert available_templates() == ["alpaca", "alpaca_legacy", "alpaca_short", "vigogne"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_prompt_strings(name):
    prompter = Prompter(name)
    with_input, without_input = EXPECTED[name]
    assert prompter.generate_prompt("Sum the numbers.", "2 and 3") == with_input
    assert prompter.generate_prompt("Name a color.") == without_input
    assert prompter.generate_prompt("Name a color.", "") == without_input
    assert prompter.generate_prompt("Name a color.", None, "Blue.") == without_input + "Blue."


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_get_response(name):
    prompter = Prompter(name)
    prompt = prompter.generate_prompt("Name a color.")
    assert prompter.get_response(prompt + " Blue is a color.\n") == "Blue is a color."
    assert prompter.get_response("<s> " + prompt + "Red") == "Red"
    # An instruction quoting the marker would fool a plain split; the prompt-aware form is exact.
    tricky = prompter.generate_prompt("Explain what '### Response:' and '### Réponse:' mean.")
    assert prompter.get_response(tricky + "A marker.", prompt=tricky) == "A marker."


def test_templates_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Prompter().generate_prompt("Name a color.") == EXPECTED["alpaca"][1]


def test_template_from_a_json_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "description": "test",
                "prompt_input": "Q: {instruction} ({input})\nA:",
                "prompt_no_input": "Q: {instruction}\nA:",
                "response_split": "A:",
            }
        )
    )
    prompter = Prompter(str(path))
    assert prompter.generate_prompt("hi", "there") == "Q: hi (there)\nA:"
    assert prompter.get_response("Q: hi\nA: hello") == "hello"


def test_unknown_template_lists_choices():
    with pytest.raises(ValueError) as err:
        Prompter("alpaka")
    message = str(err.value)
    assert "alpaka" in message and "alpaca_short" in message and "vigogne" in message


def test_bad_template_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Prompter(str(broken))
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"prompt_input": "{instruction} {input}"}))
    with pytest.raises(ValueError, match="prompt_no_input"):
        Prompter(str(incomplete))
    with pytest.raises(ValueError, match="does not exist"):
        Prompter(str(tmp_path / "missing.json"))


GOOD = {
    "prompt_input": "{instruction} / {input}\n",
    "prompt_no_input": "{instruction}\n",
    "response_split": "\n",
}


@pytest.mark.parametrize(
    "template, message",
    [
        ([GOOD], "holds a JSON list; it must be an object"),
        (
            {**GOOD, "prompt_input": "{instruction} {input} {context}"},
            r"unknown placeholder\(s\) \['\{context\}'\]",
        ),
        ({**GOOD, "prompt_no_input": "{instruction} {input}"}, r"prompt_no_input uses unknown placeholder"),
        ({**GOOD, "prompt_no_input": "{instruction} {0}"}, r"unknown placeholder\(s\) \['\{0\}'\]"),
        ({**GOOD, "prompt_input": "{instruction} {input} {"}, "not a valid format string"),
        ({**GOOD, "prompt_input": "{instruction}"}, r"prompt_input must use \{input\}"),
    ],
)
def test_template_mistakes_fail_when_the_prompter_is_built(tmp_path, template, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    with pytest.raises(ValueError, match=message) as err:
        Prompter(str(path))
    assert "mine.json" in str(err.value)


def test_literal_braces_are_allowed(tmp_path):
    path = tmp_path / "braces.json"
    path.write_text(json.dumps({**GOOD, "prompt_no_input": 'JSON like {{"a": 1}}: {instruction}'}))
    assert Prompter(str(path)).generate_prompt("x") == 'JSON like {"a": 1}: x'
