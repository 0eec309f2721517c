"""The calculator for real: SymPy behind the allow-list parser, in a killable child process."""

import pytest

from llmos.tools.calculator import CalculatorError, calculator, check, evaluate_limited, read


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("12345*6789", "83810205"),
        ("2**100", "1267650600228229401496703205376"),
        ("1/3 + 1/6", "1/2 = 0.5"),
        ("7/3", "7/3 ≈ 2.33333333333333"),
        ("-3/8", "-3/8 = -0.375"),
        ("2^10", "1024"),
        ("solve(x**2 - 4, x)", "[-2, 2]"),
        ("x + 1 = 3", "[2]"),
        ("diff(sin(x)*x, x)", "x*cos(x) + sin(x)"),
        ("integrate(x**2, x)", "x**3/3"),
        ("limit(sin(x)/x, x, 0)", "1"),
        ("simplify((x**2-1)/(x-1))", "x + 1"),
        ("N(pi, 30)", "3.14159265358979323846264338328"),
        ("factorial(25)", "15511210043330985984000000"),
    ],
)
def test_math(expression, expected):
    assert calculator(expression) == expected


def test_irrational_results_come_with_a_decimal():
    assert calculator("sqrt(8)") == "2*sqrt(2) ≈ 2.82842712474619"


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "lambda: 1",
        "x.__class__",
        "open('/etc/passwd')",
        "[c for c in x]",
        "exec('1')",
        "eval('1')",
        "'a' * 10",
        "a[0]",
        "sympify('__import__(\"os\")')",
        "__builtins__",
        "f(x=1)",
    ],
)
def test_payloads_are_rejected_without_executing(payload, tmp_path):
    with pytest.raises(CalculatorError):
        check(payload)
    with pytest.raises(CalculatorError):
        calculator(payload)


def test_syntax_error_is_readable():
    with pytest.raises(CalculatorError, match="syntax error.*'1 \\+'"):
        calculator("1 +")


def test_huge_power_is_refused_fast():
    with pytest.raises(CalculatorError, match="too large"):
        calculator("9**9**9**9")


def test_slow_evaluation_is_killed_at_the_time_limit():
    with pytest.raises(CalculatorError, match="longer than 1 s"):
        evaluate_limited("factorial(10**8)", time_limit=1.0)


def test_tool_schema():
    params = calculator.parameters
    assert params["required"] == ["expression"] and params["properties"]["expression"]["type"] == "string"


@pytest.mark.parametrize("request_, expected", [
    ("What is 17 * 23?", "391"),
    ("Subtract 7,845 from 20,000.", "12155"),
    ("What do you get if you multiply 2,718 by 3,141?", "8537238"),
    ("Please work out 65536 / 128 for me.", "512"),
    ("Add up 12.5, 7.25 and 30.25.", "50"),
    ("1234567 * 89 = ?", "109876463"),
    ("What is 999 squared minus 998 squared?", "1997"),
    ("How much is four hundred and five plus nine hundred and ninety?", "1395"),
    ("Divide seven hundred twenty by eight.", "90"),
    ("Increase 1,200 by 7.5 percent.", "1290"),
    ("What percentage of 250 is 45?", "18"),
    ("45 is what percent of 250?", "18"),
    ("My salary went from 3,200 to 3,680 a month. By what percent did it rise?", "15"),
    ("What is 3 raised to the 15th power?", "14348907"),
    ("What is 20 factorial?", "2432902008176640000"),
    ("What's the greatest common divisor of 462 and 1071?", "21"),
    ("What is the sum of all the integers from 1 to 100?", "5050"),
    ("Give me the square root of 2 to ten decimal places.", "1.4142135624"),
    ("Write 3/8 as a decimal.", "0.375"),
    ("Solve for x: 3x + 7 = 25", "[6]"),
    ("Solve x^2 - 5x + 6 = 0.", "[2, 3]"),
    ("Integrate x^2 with respect to x.", "x**3/3"),
    ("Factor the polynomial x^2 - 9.", "(x - 3)*(x + 3)"),
    ("Is 7919 a prime number?", "True"),
    ("What is the limit of sin(x)/x as x approaches 0?", "1"),
    ("Compute 12 x 12", "144"),
    ("A jacket costs $240 and is 35% off. What is the sale price?", "156"),
    ("Work out an 18% tip on a bill of 65 dollars.", "117/10 = 11.7"),
    ("If 8 friends split a bill of 1,352 dollars evenly, how much does each pay?", "169"),
    ("Split 90 dollars evenly among 6 people.", "15"),
    ("I bought 37 boxes at 14 dollars each. How much did I spend in total?", "518"),
    ("A train travels 87 km every hour for 13 hours. How far does it go?", "1131"),
    ("Take 250 away from 1000.", "750"),
])
def test_plain_math_requests_are_read_without_the_model(request_, expected):
    arguments = read(request_)
    assert arguments is not None, request_
    assert evaluate_limited(arguments["expression"]) == expected


@pytest.mark.parametrize("request_", [
    "How many seconds are there in a week?",  # a word problem with no numbers: the model's
    "Has order ZX-77 shipped yet?",  # not ZX - 77
    "Plot 101, 99, 104 as a line.",  # a list of numbers is not a sum
    "Hello there!",
    "What year did World War 2 end?",
    "Tell me about the 3 musketeers.",
])
def test_requests_that_state_no_whole_expression_are_left_to_the_model(request_):
    assert read(request_) is None
