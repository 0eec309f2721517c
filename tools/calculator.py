"""calculator: exact math with SymPy behind an allow-list parser and a time limit.

SymPy's `sympify` calls `eval`, so expressions are parsed with `ast` and translated node by
node into SymPy objects: only numbers, names, arithmetic, comparisons, lists and calls of
allow-listed functions exist; attribute access, subscripts, lambdas and dunders do not.
Evaluation runs in a forked child process that is killed at the time limit, so `9**9**9**9`
costs at most that limit.
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import re
from typing import Annotated, Any

from pydantic import Field

from llmos.toolbox import tool

MAX_EXPRESSION = 2000
TIME_LIMIT = 5.0  # seconds per evaluation
MEMORY_LIMIT = 2 << 30  # bytes of address space for the evaluating child

_FUNCTIONS = (
    "sqrt cbrt root exp log ln sin cos tan cot sec csc asin acos atan atan2 sinh cosh tanh asinh acosh atanh "
    "factorial binomial gcd lcm floor ceiling Abs abs sign re im conjugate arg Min Max min max "
    "simplify expand factor cancel apart together trigsimp nsimplify solve solveset diff integrate limit "
    "series summation product Sum Product Integral Derivative Limit Rational Integer Float "
    "Eq Ne Lt Le Gt Ge isprime prime primefactors factorint divisors totient mod N evalf Matrix det inv "
    "Poly roots degree expand_log logcombine round"
).split()
_CONSTANTS = {"pi": "pi", "E": "E", "e": "E", "I": "I", "oo": "oo", "inf": "oo", "infinity": "oo", "nan": "nan"}
_ALIASES = {"ln": "log", "abs": "Abs", "min": "Min", "max": "Max", "Integer": "Integer"}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")


class CalculatorError(ValueError):
    """An expression that is not allowed or cannot be evaluated."""


@functools.lru_cache(maxsize=1)
def _sympy_namespace() -> dict[str, Any]:
    import sympy

    ns = {}
    for name in _FUNCTIONS:
        target = _ALIASES.get(name, name)
        if target == "mod":
            ns[name] = sympy.Mod
        elif target == "evalf":
            ns[name] = sympy.N
        elif target == "round":
            ns[name] = _round
        elif hasattr(sympy, target):
            ns[name] = getattr(sympy, target)
    for name, target in _CONSTANTS.items():
        ns[name] = getattr(sympy, target)
    return ns


def _round(value: Any, places: Any = 0) -> Any:
    """round(x, n): x to n decimal places, as a decimal (Python's round, on SymPy numbers)."""
    import sympy

    number = sympy.N(value, 60)
    if not number.is_number or not number.is_real:
        raise CalculatorError(f"round() needs a real number, not {value}")
    return number.round(int(places)) if int(places) > 0 else number.round()


def _check_power(base: Any, exponent: Any) -> None:
    """Refuse integer powers whose result would have millions of digits before computing them."""
    import sympy

    if isinstance(base, sympy.Number) and isinstance(exponent, sympy.Number) and exponent.is_real:
        b, e = abs(base), abs(exponent)
        if b > 1 and e > 1 and float(e) * float(sympy.log(b, 2).evalf(5)) > 4_000_000:
            raise CalculatorError(f"result of {base}**{exponent} is too large to compute exactly")


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.FloorDiv, ast.Pow)
_UNARY = (ast.USub, ast.UAdd)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Load, ast.Constant,
          ast.Tuple, ast.List) + _BINOPS + _UNARY + _COMPARE


# Math as people write it, in order: "17 times 23", "2 to the power of 10", "15% of 80", "1,234".
_WORDS = [
    (r"^(?:what(?:'s| is| are)|how much is|calculate|compute|evaluate|find)\s+(?:the value of\s+)?", ""),
    (r"(?<=\d),(?=\d{3}\b)", ""),  # thousands separators
    (r"\bsquare root of\s+(\(.*?\)|[\w.]+)", r"sqrt(\1)"), (r"\bcube root of\s+(\(.*?\)|[\w.]+)", r"cbrt(\1)"),
    (r"\b(?:multiplied by|times)\b", "*"), (r"(?<=\d)\s*[x×]\s*(?=\d)", "*"), (r"\bdivided by\b|\bover\b", "/"),
    (r"\bplus\b|\badded to\b", "+"), (r"\bminus\b", "-"),
    (r"\b(?:to the power of|raised to(?: the power of)?)\b", "**"), (r"\bsquared\b", "**2"), (r"\bcubed\b", "**3"),
    (r"(\d+(?:\.\d+)?)\s*(?:%|percent)\s+of\b", r"\1/100*"), (r"(\d+(?:\.\d+)?)\s*(?:%|percent)(?!\s*[\d(])", r"(\1/100)"),
    (r"\bmod(?:ulo)?\b(?!\s*\()", "%"),
]


_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_NUMBER_WORDS = re.compile(r"\b(?:(?:%s)(?:[\s-]+(?:and[\s-]+)?(?=%s))?)+\b" % (
    "|".join([*_UNITS, *_TENS, *_SCALES]), "|".join([*_UNITS, *_TENS, *_SCALES])), re.I)


def _words_to_number(match: re.Match) -> str:
    total = current = 0
    for word in re.split(r"[\s-]+", match.group(0).lower()):
        if word in _UNITS or word in _TENS:
            current += _UNITS.get(word, 0) + _TENS.get(word, 0)
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word in _SCALES:
            total, current = total + max(current, 1) * _SCALES[word], 0
    return str(total + current)


def normalize(expression: str) -> str:
    """An expression in the calculator's syntax: operator words and signs people use become operators."""
    text = expression.strip().rstrip("?.!").strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
    text = _NUMBER_WORDS.sub(_words_to_number, text)  # "twelve times eleven" -> "12 times 11"
    for pattern, repl in _WORDS:
        text = re.sub(pattern, repl, text, flags=re.I)
    return text


# Reading a plain math request without the model ("Subtract 7,845 from 20,000" -> "20000 - 7845").
# Phrases whose operands come in another order than the operators take them, or that name an
# operation, become the expression they state; the rest is normalize's operator words.
_N = r"(-?\d+(?:\.\d+)?)"
_LIST = rf"({_N}(?:\s*,\s*{_N})*,?\s+and\s+{_N})"
_PHRASES = [
    (rf"\b(?:subtract|take away|take|deduct)\s+{_N}\s+(?:away\s+)?from\s+{_N}", r"(\2 - \1)"),
    (rf"\badd\s+{_N}\s+to\s+{_N}", r"(\2 + \1)"),
    (rf"\bmultiply\s+{_N}\s+(?:by|and|with)\s+{_N}", r"(\1 * \2)"),
    (rf"\bdivide\s+{_N}\s+by\s+{_N}", r"(\1 / \2)"),
    (rf"\b(?:the\s+)?difference between\s+{_N}\s+and\s+{_N}", r"(\1 - \2)"),
    (rf"\b(?:the\s+)?(?:sum|total) of (?:all\s+)?(?:the\s+)?(?:integers|numbers|whole numbers) from\s+{_N}\s+to\s+{_N}",
     r"summation(k, (k, \1, \2))"),
    (rf"\b(?:increase|raise|grow)\s+{_N}\s+by\s+{_N}\s*(?:%|percent)", r"(\1 * (1 + \2/100))"),
    (rf"\b(?:decrease|reduce|lower|cut)\s+{_N}\s+by\s+{_N}\s*(?:%|percent)", r"(\1 * (1 - \2/100))"),
    (rf"\bwhat (?:percent(?:age)?|%) of\s+{_N}\s+is\s+{_N}", r"(\2 / \1 * 100)"),
    (rf"\b{_N}\s+is what (?:percent(?:age)?|%) of\s+{_N}", r"(\1 / \2 * 100)"),
    (rf"^.*?\bfrom\s+{_N}\s+to\s+{_N}\b(?=.*\bpercent)", r"((\2 - \1) / \1 * 100)"),  # the percent change
    # word problems of the commonest shapes: a discount, a tip or tax, a bill split, a price each, a rate for a time
    (rf"{_N}\b[^.?!%]*?\b{_N}\s*(?:%|percent)\s+(?:off|discount)\b", r"(\1 * (1 - \2/100))"),
    (rf"\b{_N}\s*(?:%|percent)\s+(?:tip|tax|vat|interest|commission|service charge|discount)\s+(?:on|of|for)\s+(?:a\s+|an\s+|the\s+|my\s+)?(?:[a-z]+\s+){{0,3}}?(?:of\s+)?{_N}",
     r"(\1/100 * \2)"),
    (rf"\b{_N}\s+(?:[a-z]+\s+)?(?:split|share|divide)\w*\s+(?:a\s+|an\s+|the\s+)?(?:[a-z]+\s+){{0,3}}?(?:of\s+)?{_N}", r"(\2 / \1)"),
    (rf"\b(?:split|share|divide)\w*\s+(?:a\s+|an\s+|the\s+)?(?:[a-z]+\s+){{0,3}}?(?:of\s+)?{_N}\s+(?:[a-z]+\s+)?(?:evenly\s+|equally\s+)?(?:among|between|by|into)\s+{_N}",
     r"(\1 / \2)"),
    (rf"\b{_N}\s+(?:[a-z]+\s+){{1,2}}(?:at|for|costing)\s+{_N}\s+(?:[a-z]+\s+)?(?:each|apiece|a piece|per [a-z]+)", r"(\1 * \2)"),
    (rf"\b{_N}\s+[a-z]+\s+(?:every|each|per|an|a)\s+([a-z]+)\s+for\s+{_N}\s+\2s?\b", r"(\1 * \3)"),
    (rf"\b(?:raised\s+)?to the\s+{_N}(?:st|nd|rd|th)?\s+power", r"** \1"),
    (rf"\b{_N}\s+factorial|\bfactorial of\s+{_N}", r"factorial(\1\2)"),
    (rf"\b(?:the\s+)?(?:greatest common divisor|gcd|highest common factor|hcf|greatest common factor)\s+of\s+{_N}\s+and\s+{_N}", r"gcd(\1, \2)"),
    (rf"\b(?:the\s+)?(?:least common multiple|lcm|lowest common multiple)\s+of\s+{_N}\s+and\s+{_N}", r"lcm(\1, \2)"),
    (rf"\bis\s+{_N}\s+(?:a\s+)?prime(?:\s+number)?", r"isprime(\1)"),
    (r"(?<=\d)\s*x\s*(?=\d)", " * "),  # 3 x 4
    (r"(?<![\w.])(\d+(?:\.\d+)?)([a-z])(?![\w(])", r"\1*\2"),  # 3x -> 3*x
]
_LISTS = [(rf"\b(?:add(?:\s+up|\s+together)?|(?:the\s+)?(?:sum|total) of)\s+{_LIST}", "+"),
          (rf"\b(?:the\s+)?product of\s+{_LIST}", "*")]
_SYMBOLIC = [  # an operation on a whole expression: "integrate x^2 with respect to x"
    (r"^(?:please\s+)?(?:integrate|find the integral of|(?:what is )?the integral of)\s+(.+?)(?:\s+(?:with respect to|dx|d)\s*([a-z]))?$",
     lambda m: f"integrate({m[1]}, {m[2] or 'x'})"),
    (r"^(?:please\s+)?(?:differentiate|find the derivative of|(?:what is )?the derivative of)\s+(.+?)(?:\s+with respect to\s+([a-z]))?$",
     lambda m: f"diff({m[1]}, {m[2] or 'x'})"),
    (r"^(?:please\s+)?(factor|simplify|expand)\s+(?:the\s+(?:polynomial|expression|function)\s+)?(.+)$",
     lambda m: f"{m[1].lower()}({m[2]})"),
    (r"^(?:what is\s+)?the limit of\s+(.+?)\s+as\s+([a-z])\s+(?:approaches|goes to|tends to|->)\s+(\S+)$",
     lambda m: f"limit({m[1]}, {m[2]}, {m[3]})"),
    (r"^(?:please\s+)?solve(?:\s+for\s+[a-z])?\s*:?\s+(.+?)(?:\s+for\s+[a-z])?$", lambda m: m[1]),
]
_PLACES = re.compile(r"\s*\b(?:to|with|in)\s+(\d+)\s+(?:decimal places|decimals|places|digits after the (?:decimal )?point)\b", re.I)
_DECIMAL = re.compile(r"\s*\b(?:as|in) (?:a )?decimal(?: number| form)?\b", re.I)


def _plain(expression: str) -> bool:
    """Math as a request states it: not a bare list of numbers ("101, 99, 104"), and no names but
    functions and one-letter variables (so "order ZX-77" is not read as ZX - 77)."""
    tree = check(expression)
    if isinstance(tree.body, (ast.Tuple, ast.List)):
        return False
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(_FUNCTIONS) - set(_CONSTANTS)
    return all(len(name) == 1 for name in names)


def _unwrapped(expression: str) -> str:
    """Without parentheses around the whole expression: "(20000 - 7845)" -> "20000 - 7845"."""
    while expression.startswith("(") and expression.endswith(")"):
        depth = 0
        for i, c in enumerate(expression):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0 and i < len(expression) - 1:
                return expression  # "(1 + 2) * (3 + 4)": the first group closes early
        expression = expression[1:-1].strip()
    return expression


MAX_READ_WORDS = 40  # longer requests are not plain math; spans grow with the square of the length


@functools.lru_cache(maxsize=256)  # the router asks, then the kernel: one reading per request
def _read(request: str) -> tuple[tuple[str, str], ...] | None:
    made = read_uncached(request)
    return tuple(made.items()) if made else None


def read(request: str) -> dict[str, str] | None:
    """The calculator call a plain math request states (see read_uncached), remembered per request."""
    made = _read(request)
    return dict(made) if made else None


def read_uncached(request: str) -> dict[str, str] | None:
    """The calculator call a plain math request states, read without the model: {"expression": ...}
    when some span of the request, its phrases read as math, computes and carries every number
    the request states; None otherwise (a word problem is left to the model)."""
    text = _NUMBER_WORDS.sub(_words_to_number, " ".join(request.split()))
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text).replace("$", "")
    stated = set(re.findall(r"\d+(?:\.\d+)?", text))
    if not stated or len(text) > MAX_EXPRESSION or len(text.split()) > MAX_READ_WORDS:
        return None
    places = _PLACES.search(text)
    decimal = _DECIMAL.search(text)
    text = _DECIMAL.sub("", _PLACES.sub("", text))
    for pattern, repl in _PHRASES:
        text = re.sub(pattern, repl, text, flags=re.I)
    for pattern, joiner in _LISTS:
        text = re.sub(pattern, lambda m: "(" + f" {joiner} ".join(re.findall(_N, m[1])) + ")", text, flags=re.I)
    text = normalize(text)
    for sentence in [text, *re.split(r"(?<=[.?!:;])\s+", text)]:
        sentence = sentence.strip().rstrip("?.!").strip()
        for pattern, build in _SYMBOLIC:
            if (m := re.match(pattern, sentence, re.I)):
                text = text.replace(sentence, build(m))
                break
    words = text.split()
    for n in range(len(words), 0, -1):  # the longest span that computes and carries every stated number
        for i in range(len(words) - n + 1):
            span = " ".join(words[i:i + n]).strip(" \t,;:!?\"'`=").rstrip(".")
            if places:
                span = f"round({span}, {places[1]})"
            elif decimal:
                span = f"N({span})"
            try:
                made = _computes({"expression": span})
            except CalculatorError:
                continue
            if made and stated <= set(re.findall(r"\d+(?:\.\d+)?", made["expression"])) and _plain(made["expression"]):
                return {"expression": _unwrapped(made["expression"])}
    return None


def check(expression: str) -> ast.Expression:
    """Parse and allow-list an expression without computing anything; raises CalculatorError."""
    text = normalize(expression)
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION} characters")
    if text.count("=") == 1 and not any(c in text for c in "<>!"):
        left, right = text.split("=")
        text = f"Eq({left}, {right})"  # 'x + 1 = 3' reads as an equation
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise CalculatorError(f"syntax error{where}: {exc.msg} in {expression.strip()!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise CalculatorError(f"'{type(node).__name__}' is not allowed in a calculator expression")
        if isinstance(node, ast.Name) and (node.id.startswith("_") or not _NAME_RE.match(node.id)):
            raise CalculatorError(f"name {node.id!r} is not allowed")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise CalculatorError(f"only numbers are allowed as literals, not {node.value!r}")
        if isinstance(node, ast.Compare) and len(node.ops) != 1:
            raise CalculatorError("chained comparisons are not supported; use Eq(a, b)")
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            if name not in _FUNCTIONS:
                raise CalculatorError(f"function {name!r} is not allowed; allowed: {', '.join(sorted(_FUNCTIONS))}")
            if node.keywords:
                raise CalculatorError("keyword arguments are not supported")
    return tree


class _Translator(ast.NodeVisitor):
    """Builds SymPy objects from a tree that `check` accepted (this is where computing happens)."""

    def __init__(self) -> None:
        import sympy

        self.sp = sympy
        self.ns = dict(_sympy_namespace())
        self.ops = {
            ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
            ast.Div: lambda a, b: a / b, ast.Mod: sympy.Mod, ast.FloorDiv: lambda a, b: sympy.floor(a / b),
            ast.Pow: self._pow,
        }
        self.rel = {ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne, ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge}

    def _pow(self, a: Any, b: Any) -> Any:
        _check_power(a, b)
        return a**b

    def generic_visit(self, node: ast.AST) -> Any:
        raise CalculatorError(f"'{type(node).__name__}' is not allowed in a calculator expression")

    def visit_Expression(self, node: ast.Expression) -> Any:
        return self.visit(node.body)

    def visit_Constant(self, node: ast.Constant) -> Any:
        return self.sp.Integer(node.value) if isinstance(node.value, int) else self.sp.Float(repr(node.value))

    def visit_Name(self, node: ast.Name) -> Any:
        return self.ns.get(node.id) or self.sp.Symbol(node.id)  # any other plain name is a math variable

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        return self.ops[type(node.op)](self.visit(node.left), self.visit(node.right))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        value = self.visit(node.operand)
        return -value if isinstance(node.op, ast.USub) else value

    def visit_Compare(self, node: ast.Compare) -> Any:
        return self.rel[type(node.ops[0])](self.visit(node.left), self.visit(node.comparators[0]))

    def visit_Tuple(self, node: ast.Tuple) -> Any:
        return self.sp.Tuple(*[self.visit(e) for e in node.elts])

    def visit_List(self, node: ast.List) -> Any:
        return [self.visit(e) for e in node.elts]

    def visit_Call(self, node: ast.Call) -> Any:
        return self.ns[node.func.id](*[self.visit(a) for a in node.args])


def parse(expression: str) -> Any:
    """Translate an allow-listed expression into a SymPy object (no eval; may compute)."""
    return _Translator().visit(check(expression))


def _decimal(value: Any) -> str:
    """"= d" for a fraction with a short exact decimal expansion (3/8 = 0.375), else "≈ d" (15 digits)."""
    import sympy

    p, q = int(value.p), int(value.q)
    places = max(sympy.multiplicity(2, q), sympy.multiplicity(5, q))
    if places > 40 or q != 2 ** sympy.multiplicity(2, q) * 5 ** sympy.multiplicity(5, q):
        return f"≈ {sympy.N(value, 15)}"
    digits = str(abs(p) * 10**places // q).rjust(places + 1, "0")
    return f"= {'-' if p < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def _format(value: Any, digits: int | None) -> str:
    import sympy

    if isinstance(value, sympy.Eq) or isinstance(value, sympy.Rel):
        value = sympy.solve(value)  # an equation on its own: solve it
    if digits:
        if isinstance(value, (list, tuple)):
            return str([sympy.N(v, digits) for v in value])
        return str(sympy.N(value, digits))
    if isinstance(value, sympy.Rational) and not value.is_Integer:  # 117/10 = 11.7; 7/3 ≈ 2.33333333333333
        return f"{value} {_decimal(value)}"
    if isinstance(value, sympy.Basic) and value.is_number and not (value.is_Rational or value.is_Float) and value.is_finite:
        return f"{value} ≈ {sympy.N(value, 15)}"
    if isinstance(value, sympy.Float) and "e" not in str(value):  # 50.0000000000000 -> 50, 0.375000 -> 0.375
        return str(value).rstrip("0").rstrip(".") if "." in str(value) else str(value)
    return str(value)


def evaluate(expression: str, digits: int | None = None) -> str:
    """Parse and evaluate in this process (no time limit); the tool adds the limit."""
    return _format(parse(expression), digits)


def _mapped_bytes() -> int:
    """This process's virtual address space in bytes (0 where /proc cannot tell)."""
    import os

    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child(conn: Any, expression: str, digits: int | None) -> None:
    import resource

    # a memory bomb fails here, not in the kernel: MEMORY_LIMIT more than the address space the
    # fork inherited (a loaded model, its KV cache and thread stacks are mapped already)
    limit = _mapped_bytes() + MEMORY_LIMIT
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", evaluate(expression, digits)))
    except CalculatorError as exc:
        conn.send(("error", str(exc)))
    except MemoryError:
        conn.send(("error", f"evaluation needed more than {MEMORY_LIMIT >> 20} MiB of memory"))
    except RecursionError:
        conn.send(("error", "expression is nested too deeply"))
    except Exception as exc:  # noqa: BLE001 - SymPy raises many types; report, don't crash
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def evaluate_limited(expression: str, digits: int | None = None, time_limit: float = TIME_LIMIT) -> str:
    """Evaluate in a forked child that is killed after `time_limit` seconds."""
    check(expression)  # reject bad input here, fast, without computing anything
    _sympy_namespace()  # import SymPy once here, so forked children start with it loaded (~300 ms saved per call)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, expression, digits), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(time_limit):
            raise CalculatorError(f"evaluation took longer than {time_limit:g} s and was stopped")
        status, text = parent.recv()
    except EOFError:
        raise CalculatorError("evaluation crashed (out of memory?)") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(1)
        parent.close()
    if status == "error":
        raise CalculatorError(text)
    return text


def _computes(arguments: Any) -> Any:
    """A calculator call makes sense when its expression parses and has something to compute;
    the expression comes back as the calculator reads it ("what is 17 times 23" -> "17 * 23")."""
    text = normalize(str(arguments.get("expression", "")))
    check(text)
    if not re.search(r"\d|\b(pi|E|oo|x|y)\b", text) or re.fullmatch(r"\s*-?[\d.]+\s*", text):
        return False
    return {**arguments, "expression": text}


EXAMPLES = (
    "What is 17 * 23?", "Compute 48213 times 91577.", "What's 2 to the power of 64?", "What is 15% of 240?",
    "Calculate the square root of 1764.", "How much is 1234 + 5678 - 910?", "Divide 7 by 3 exactly.",
    "Solve x**2 - 5*x + 6 = 0 for x.", "Integrate x**2 * sin(x) with respect to x.", "What is 100 factorial?",
    "Use the calculator: 3.5 * (2 + 8) / 4", "Simplify (x**2 - 1)/(x - 1).", "What is the derivative of x**3 + 2x?",
    "A shop packs 12 boxes of 8 eggs. How many eggs is that in total?",
    "The price rose from 50 to 65 dollars. By what percent did it go up?", "What is 25 squared minus 24 squared?",
    "What is the sum of the whole numbers from 1 to 50?", "Four friends share a 96 dollar bill equally; what does each pay?",
)
PATTERNS = (
    r"\d\s*(?:[-+*/^×÷%]|\*\*)\s*\(?\s*-?\d",  # 17 * 23, 2^10, 3.5*(2+8)
    r"\d+\s+(?:times|plus|minus|divided by|multiplied by|to the power of|mod)\s+\d", r"\d\s+(?:squared|cubed)\b",
    r"\d\s*(?:%|percent\b)",
    r"\b(?:square root|cube root|factorial|percent of|integrate|derivative|differentiate|solve)\b",
    r"\bcalculat(?:e|or)\b",
)


@tool(timeout=TIME_LIMIT + 5, touches="nothing (pure computation in a child process)", effects="read-only",
      examples=EXAMPLES, patterns=PATTERNS, check=_computes, says="{expression} = {result}", reads=read)
def calculator(
    expression: Annotated[str, Field(description="Math in Python/SymPy syntax, e.g. '12345*6789', '2**100', 'integrate(x**2, x)', 'solve(x**2 - 4, x)', 'N(pi, 50)'")],
) -> str:
    """Evaluate a math expression exactly with SymPy: arithmetic, fractions, big integers, simplify, solve, diff, integrate, limits."""
    return evaluate_limited(expression)
