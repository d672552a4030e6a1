"""Numbers read from text (issue 21, class 1): the one parser, its click types, and the plans and lists built on it.

Each refusal is one TextError line (or SkipPlanError / LegoError where a caller words it) naming the field,
the text and the range; nothing is read the way int() or float() would read it.
"""

from __future__ import annotations

import math

import click
import pytest
from click.testing import CliRunner

from lego_model import SkipPlan, SkipPlanError, get_config
from lego_model.errors import LegoError, TextError
from lego_model.images import parse_seeds
from lego_model.parsing import BoundedFloat, BoundedInt, parse_float, parse_fraction, parse_int

PG = get_config("lego_S_PG_64")

# Members of the class: texts int() or float() read (or choke on) that are not a plain ASCII number.
NOT_WHOLE = {
    "Arabic-Indic one": "\u0661",
    "Devanagari two": "\u0968",
    "fullwidth three": "\uff13",
    "superscript two": "\u00b2",
    "Arabic-Indic 10": "\u0661\u0660",
    "mixed scripts": "1\u0662",
    "underscore": "1_0",
    "plus sign": "+1",
    "minus sign": "-1",
    "empty": "",
    "only spaces": "   ",
    "inner space": "1 0",
    "ideographic space": "\u30001",
    "no-break space": "1\u00a0",
    "float": "1.0",
    "exponent": "1e3",
    "hex": "0x10",
    "nan": "nan",
    "inf": "inf",
    "word": "four",
    "newline": "1\n",
}


@pytest.mark.parametrize("name", NOT_WHOLE)
def test_parse_int_refuses_every_other_form(name):
    with pytest.raises(TextError, match=r"^cannot parse --batch .* as a whole number: write ASCII digits 0-9, from 1"):
        parse_int(NOT_WHOLE[name], "--batch", 1, 1024)


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1), ("1024", 1024), ("007", 7), (" 8\t", 8), ("0" * 5000 + "9", 9), ("0", 0)]
)
def test_parse_int_reads_ascii_digits_with_leading_zeros_and_blanks(text, value):
    assert parse_int(text, "--batch", 0, 1024) == value


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("1025", "1025"),
        ("100000000000000000000", "100000000000000000000"),
        ("9" * 5000, "999999999999... (5000 digits)"),
        ("0", "0"),
    ],
)
def test_parse_int_range_is_explicit_and_huge_texts_are_cut(text, shown):
    with pytest.raises(TextError) as info:
        parse_int(text, "--batch", 1, 1024)
    assert str(info.value) == f"--batch {shown} is out of range (minimum 1, maximum 1024)"


def test_parse_int_refuses_what_is_not_text():
    for value in (3, None, b"3", 3.0):
        with pytest.raises(TextError, match="expected text"):
            parse_int(value, "seed", 0, 9)


@pytest.mark.parametrize(("text", "value"), [("0.6", 0.6), (".25", 0.25), ("1.", 1.0), ("1", 1.0), ("0", 0.0)])
def test_fractions(text, value):
    assert parse_fraction(text, "FROM") == value


@pytest.mark.parametrize(
    "text", ["nan", "inf", "-0", "+0.5", "0,5", "\u0660.\u0665", "1_0", "", "0.5.5", "0x1", "infinity", "½"]
)
def test_fraction_forms_refused(text):
    with pytest.raises(TextError, match="as a number: write a decimal such as 0.6"):
        parse_fraction(text, "FROM")


@pytest.mark.parametrize("text", ["1.5", "2", "1e999", "1.0000001"])
def test_fraction_range(text):
    with pytest.raises(TextError, match=r"is outside \[0, 1\]"):
        parse_fraction(text, "FROM")


def test_decimal_exponents_and_inf_only_where_unbounded():
    assert parse_float("5e-4", "--lr", 0, 1) == 5e-4
    assert parse_float("1E+2", "x", 0, 100) == 100.0
    assert parse_float("inf", "--S-max", 0, math.inf) == math.inf
    with pytest.raises(TextError, match="as a number"):
        parse_float("inf", "--cfg-scale", 0, 100)


def _cli(param_type):
    @click.command()
    @click.option("--n", type=param_type)
    def main(n):
        click.echo(repr(n))

    return main


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("100000000000000000000", "100000000000000000000 is out of range (minimum 1, maximum 4096)"),
        ("\u0661", "cannot parse '\u0661' as a whole number"),
        ("\u00b2", "cannot parse '\u00b2' as a whole number"),
        ("", "cannot parse '' as a whole number"),
        ("1_0", "cannot parse '1_0'"),
        ("0", "0 is out of range (minimum 1, maximum 4096)"),
        ("2.5", "cannot parse '2.5'"),
    ],
)
def test_bounded_int_option(text, fragment):
    result = CliRunner().invoke(_cli(BoundedInt(1, 4096)), ["--n", text], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error == [f"Error: Invalid value for '--n': {fragment}" + error[0].split(fragment, 1)[1]], result.output
    assert CliRunner().invoke(_cli(BoundedInt(1, 4096)), ["--n", " 0042"]).output == "42\n"


def test_bounded_int_help_shows_the_range_and_defaults_pass_through():
    main = _cli(BoundedInt(1, 4096))
    assert "1<=x<=4096" in CliRunner().invoke(main, ["--help"]).output
    assert CliRunner().invoke(main, []).output == "None\n"
    with pytest.raises(ValueError, match="int bounds"):
        BoundedInt(1, None)
    with pytest.raises(ValueError, match="low <= high"):
        BoundedInt(5, 1)


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "\u0661.5", "1_0", ""])
def test_bounded_float_option(text):
    result = CliRunner().invoke(_cli(BoundedFloat(0, 1, low_open=True)), ["--n", text], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output and "Error: Invalid value" in result.output
    assert CliRunner().invoke(_cli(BoundedFloat(0, 1, low_open=True)), ["--n", "5e-4"]).output == "0.0005\n"
    assert CliRunner().invoke(_cli(BoundedFloat(0, 1, low_open=True)), ["--n", "0"]).exit_code == 2


def test_a_finite_unbounded_float_option_refuses_inf_and_does_not_offer_it():
    main = _cli(BoundedFloat(0, math.inf, finite=True))
    assert "x>=0.0" in CliRunner().invoke(main, ["--help"]).output  # not 0.0<=x<=inf
    for text in ("inf", "1e999"):
        result = CliRunner().invoke(main, ["--n", text])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "or inf" not in CliRunner().invoke(main, ["--n", "x"]).output
    assert CliRunner().invoke(main, ["--n", "1e300"]).output == "1e+300\n"
    assert "or inf" in CliRunner().invoke(_cli(BoundedFloat(0, math.inf)), ["--n", "x"]).output
    assert CliRunner().invoke(_cli(BoundedFloat(0, math.inf)), ["--n", "inf"]).output == "inf\n"


# ------------------------------------------------------------------------------------------ skip plans, seeds


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ("\u0661@0:1", "is not a brick index (ASCII digits) or 'top'"),
        ("\u00b2@0:1", "is not a brick index"),
        ("\uff11@0:1", "is not a brick index"),
        ("1_0@0:1", "is not a brick index"),
        ("+1@0:1", "is not a brick index"),
        ("@0:1", "'' is not a brick index"),
        ("1,,2@0:1", "is not a brick index"),
        ("9" * 5000 + "@0:1", "is not a brick index"),
        ("1@\u0660:1", "cannot parse FROM"),
        ("1@0:\u0661", "cannot parse TO"),
        ("1@nan:1", "cannot parse FROM 'nan'"),
        ("1@0:inf", "cannot parse TO 'inf'"),
        ("1@:1", "cannot parse FROM ''"),
        ("1@0:", "cannot parse TO ''"),
        ("1@-0:1", "cannot parse FROM '-0'"),
        ("1@0:1:1", "cannot parse skip rule"),
        ("1@0@1:2", "cannot parse skip rule"),
        ("1@0\u00a0:1", "cannot parse FROM"),
        ("1@0:2", "TO 2 is outside [0, 1]"),
    ],
)
def test_skip_rules_read_numbers_through_the_parser(rule, fragment):
    with pytest.raises(SkipPlanError) as info:
        SkipPlan.parse(rule, PG)
    message = str(info.value)
    assert fragment in message and len(message) < 300 and "\n" not in message, message
    with pytest.raises(SkipPlanError):  # the Python API's text plans take the same path
        SkipPlan.of(rule, PG)


@pytest.mark.parametrize("preset", ["global@", "local@", "global@\u0660.5", "global@nan", "global@1.5", "global@-0.1"])
def test_presets_read_their_break_point_through_the_parser(preset):
    with pytest.raises(SkipPlanError, match="skip preset"):
        SkipPlan.preset(preset, PG)
    with pytest.raises(SkipPlanError, match="skip preset"):
        SkipPlan.of([preset], PG)


def test_accepted_plan_texts_and_str_round_trips():
    assert SkipPlan.parse(" 0 , 1 @ 0 : .5 ", PG) == SkipPlan.parse("0,1@0:0.5", PG)
    assert SkipPlan.preset("global @ 0.7", PG) == SkipPlan.preset("global@0.7", PG)
    third = SkipPlan.parse(["2@0.3333333333333333:1", "0@0:0.00001"], PG)
    assert str(third) == "2@0.3333333333333333:1 0@0:0.00001"
    # Each rule's text reads back as that rule (it was '2@0.333333:1' and '0@0:1e-05' before: another plan).
    assert SkipPlan.of([str(rule) for rule in third.rules], PG) == third
    assert str(SkipPlan.parse("top@0.6:1", PG)) == "2@0.6:1"


@pytest.mark.parametrize("plan", [123, [2], [None], {"2@0:1"}, b"2@0:1"])
def test_plans_that_are_not_text_are_refused(plan):
    with pytest.raises(SkipPlanError, match="pass"):
        SkipPlan.of(plan, PG)
    with pytest.raises(SkipPlanError, match="pass"):
        SkipPlan.parse(plan, PG)


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("\u0661", LegoError, "cannot parse seeds"),
        ("0-\u0969", LegoError, "cannot parse seeds"),
        ("1_0", LegoError, "cannot parse seeds"),
        ("+1", LegoError, "cannot parse seeds"),
        ("", LegoError, "cannot parse seeds"),
        ("1e3", LegoError, "cannot parse seeds"),
        ("1-2-3", LegoError, "cannot parse seeds"),
        ("4294967296", TextError, "seed 4294967296 is out of range (minimum 0, maximum 4294967295)"),
        ("1-" + "9" * 5000, TextError, "seed 999999999999... (5000 digits) is out of range"),
    ],
)
def test_seeds_read_numbers_through_the_parser(text, error, fragment):
    with pytest.raises(error) as info:
        parse_seeds(text)
    assert fragment in str(info.value) and len(str(info.value)) < 200


def test_seeds_accept_blanks_and_leading_zeros():
    assert parse_seeds(" 007 , 9-10") == [7, 9, 10]
    assert parse_seeds("00000000000001") == [1]  # 14 digits, but the number is 1


# ------------------------------------------------------------------ parse_json (issue 21, class 5)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ("1" * 5000, "a number of 5000 digits"),
        ("-" + "9" * 4301, "a number of 4301 digits"),
        ("1" * 101, "a number of 101 digits"),
        ("1e999", "not finite"),
        ("-1e999", "not finite"),
        ("0." + "1" * 500, "a number of 502 characters"),
        ('{"steps": NaN}', "NaN, which is not a JSON number"),
        ("-Infinity", "-Infinity, which is not a JSON number"),
        ("Infinity", "Infinity, which is not a JSON number"),
        (b"\xff\xfe", "not JSON"),
        ('{"a": 1,}', "not JSON"),
        ("", "not JSON"),
    ],
)
def test_parse_json_refuses_what_is_not_plain_json_data(text, fragment):
    from lego_model.parsing import parse_json

    with pytest.raises(TextError, match=fragment) as info:
        parse_json(text)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_parse_json_reads_plain_data_and_infinity_only_where_asked():
    from lego_model.parsing import parse_json

    assert parse_json('{"a": [1, 2.5, -3, "x", null, true], "b": {"c": 1e-5}}') == {
        "a": [1, 2.5, -3, "x", None, True],
        "b": {"c": 1e-5},
    }
    assert parse_json("9" * 100) == int("9" * 100)
    assert parse_json('{"S_max": Infinity}', infinity=True) == {"S_max": math.inf}
    with pytest.raises(TextError, match="NaN"):
        parse_json("NaN", infinity=True)
