import pytest

from ptjax.data.chat_template import render

# SmolLM2-Instruct's template, verbatim.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)
CHAT = [{"role": "user", "content": "hi ✓"}, {"role": "assistant", "content": " hello "}]


def test_chatml_renders_like_smollm2():
    assert render(CHATML, CHAT) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nhi ✓<|im_end|>\n"
        "<|im_start|>assistant\n hello <|im_end|>\n"
    )
    assert render(CHATML, CHAT[:1], add_generation_prompt=True) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nhi ✓<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}] + CHAT[:1]
    assert render(CHATML, system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi ✓<|im_end|>\n"
    )


def test_llama3_renders_bos_headers_and_trimmed_content():
    text = render(LLAMA3, CHAT, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi ✓<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
    )
    prompt = render(LLAMA3, CHAT[:1], add_generation_prompt=True, bos_token="<s>")
    assert prompt == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nhi ✓<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_whitespace_control_and_helpers_match_transformers():
    # trim_blocks / lstrip_blocks: block tags take their own line without leaving blank lines.
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
                "    {% endif %}\n{% endfor %}")
    assert render(template, CHAT) == "[hi ✓]\n"
    # loopcontrols, tojson keeping non-ASCII (and not HTML-escaping), indent, extra variables.
    template = ("{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}"
                "{{ m | tojson }}{% endfor %}|{{ tools | tojson(indent=1) }}|{{ documents }}"
                "|{{ x }}")
    expected = '{"role": "user", "content": "hi ✓"}|[\n {\n  "a": "<é>"\n }\n]|None|7'
    assert render(template, CHAT, tools=[{"a": "<é>"}], x=7) == expected
    # `{% generation %}` blocks (transformers' assistant-mask marker) render their body.
    assert render("{% generation %}a{{ 1 + 1 }}{% endgeneration %}", []) == "a2"
    assert render("{{ strftime_now('%Y') | length }}", []) == "4"
    assert render("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}", []) == "2"
    assert render("{{ dict(a=1)['a'] }}", []) == "1"


def test_raise_exception_names_the_source():
    template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('bad role') }}"
                "{% endif %}")
    with pytest.raises(ValueError, match=r"^models/x/tokenizer_config\.json: bad role$"):
        render(template, CHAT, source="models/x/tokenizer_config.json")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    # The real `dict` type would let a template mutate its inputs through unbound methods.
    "{% set _ = dict.update(messages[0], {'content': 'x'}) %}{{ messages[0].content }}",
])
def test_sandbox_escapes_fail_naming_the_source(template):
    with pytest.raises(ValueError, match=r"^evil\.jinja: "):
        render(template, CHAT, source="evil.jinja")


@pytest.mark.parametrize("template, problem", [
    ("{% if %}", "syntax error on line 1"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ("{{ nothing.here }}", "UndefinedError"),
])
def test_template_errors_are_value_errors(template, problem):
    with pytest.raises(ValueError, match=rf"^model/chat_template\.jinja: .*{problem}"):
        render(template, CHAT, source="model/chat_template.jinja")


def test_only_plain_data_reaches_the_template():
    class Sneaky(str):
        pass

    with pytest.raises(TypeError, match="messages\\[0\\]\\['content'\\].*Sneaky"):
        render(CHATML, [{"role": "user", "content": Sneaky("x")}])
    with pytest.raises(TypeError, match="tools.*object"):
        render(CHATML, [], tools=object())
