"""calculator: arithmetic on a whitelisted subset of Python expression syntax.

The expression is parsed, never executed by Python: only numeric literals, arithmetic
operators, parentheses and a few math functions are interpreted, so a model cannot reach
names, attributes or builtins. Every intermediate value is bounded, because a short text
such as ``9**9**9`` would otherwise ask for gigabytes of digits.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from pydantic import Field

from toolchain_service.tools.base import JSONValue, Tool, ToolArguments, ToolFailure

Number = int | float

MAX_EXPRESSION_CHARS = 500
#: Bounds the evaluator's recursion; the parser alone would accept ~500 unary minuses.
MAX_DEPTH = 100
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300


class CalculatorArgs(ToolArguments):
    expression: str = Field(
        description=(
            "Arithmetic expression, e.g. '(2 + 3) * sqrt(16) / 7' or '2 ** 10 % 7'. "
            "Use ** for powers; no variables."
        ),
        max_length=MAX_EXPRESSION_CHARS,
        examples=["3 * (4 + 5)"],
    )


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}

_UNSUPPORTED_OPERATORS: dict[type[ast.AST], str] = {
    ast.BitXor: "'^' (use ** for powers)",
    ast.BitAnd: "'&'",
    ast.BitOr: "'|'",
    ast.LShift: "'<<'",
    ast.RShift: "'>>'",
    ast.MatMult: "'@'",
    ast.Invert: "'~'",
    ast.Not: "'not'",
}

_UNSUPPORTED_SYNTAX: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripting",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator",
    ast.IfExp: "conditional expression",
    ast.List: "list",
    ast.Tuple: "tuple",
    ast.Set: "set",
    ast.Dict: "dict",
    ast.NamedExpr: "assignment",
    ast.JoinedStr: "f-string",
    ast.Starred: "starred argument",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slice",
}

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


def _round(value: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int):
        raise ToolFailure("round(): the number of digits must be a whole number")
    return round(value, ndigits)


def _log(value: Number, base: Number | None = None) -> float:
    return math.log(value) if base is None else math.log(value, base)


# name -> (function, fewest arguments, most arguments or None for any number)
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "sqrt": (math.sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 2, None),
    "max": (max, 2, None),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
}


def _checked(value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolFailure("result is not a real number")
    if isinstance(value, float) and math.isnan(value):
        raise ToolFailure("result is not a number (NaN)")
    if abs(value) > MAX_MAGNITUDE:  # also catches inf
        raise ToolFailure(f"result is too large (limit {MAX_MAGNITUDE:g} in magnitude)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolFailure(f"exponent {exponent} is too large (limit {MAX_EXPONENT})")
    # Integer powers are exact and unbounded in Python, so refuse before computing them.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE)
    ):
        raise ToolFailure(f"result is too large (limit {MAX_MAGNITUDE:g} in magnitude)")
    try:
        result = base**exponent
    except ZeroDivisionError:
        raise ToolFailure("division by zero") from None
    except OverflowError:
        raise ToolFailure(f"result is too large (limit {MAX_MAGNITUDE:g} in magnitude)") from None
    if isinstance(result, complex):
        raise ToolFailure("result is not a real number (negative base with a fractional exponent)")
    return _checked(result)


def _unsupported(node: ast.AST) -> ToolFailure:
    if isinstance(node, ast.Constant):
        kind = "string" if isinstance(node.value, str | bytes) else type(node.value).__name__
        return ToolFailure(f"unsupported syntax: {kind} literal {node.value!r:.40}")
    what = _UNSUPPORTED_SYNTAX.get(type(node), type(node).__name__)
    return ToolFailure(f"unsupported syntax: {what}")


def _call(node: ast.Call, depth: int) -> Number:
    if not isinstance(node.func, ast.Name):
        raise _unsupported(node.func)
    name = node.func.id
    if name not in _FUNCTIONS:
        raise ToolFailure(f"unsupported function {name!r}; allowed: {', '.join(_FUNCTIONS)}")
    if node.keywords:
        raise ToolFailure(f"{name}(): keyword arguments are not supported")
    function, fewest, most = _FUNCTIONS[name]
    count = len(node.args)
    if count < fewest or (most is not None and count > most):
        if most is None:
            expected = f"{fewest} or more"
        else:
            expected = str(fewest) if fewest == most else f"{fewest} to {most}"
        raise ToolFailure(f"{name}() takes {expected} arguments, got {count}")
    args = [_evaluate(arg, depth + 1) for arg in node.args]
    try:
        return _checked(function(*args))
    except ZeroDivisionError:
        raise ToolFailure(f"division by zero in {name}()") from None
    except OverflowError:
        raise ToolFailure(f"result of {name}() is too large") from None
    except ValueError:
        raise ToolFailure(f"math domain error: {name}() is not defined for these arguments") from None


def _evaluate(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise ToolFailure(f"expression is nested too deeply (limit {MAX_DEPTH})")
    if isinstance(node, ast.Constant):
        # bool is an int subclass and complex passes as a number; neither is arithmetic here.
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise _unsupported(node)
        return _checked(node.value)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            return _power(_evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1))
        binary = _BINARY.get(type(node.op))
        if binary is None:
            raise ToolFailure(f"unsupported operator {_UNSUPPORTED_OPERATORS.get(type(node.op), '?')}")
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        try:
            return _checked(binary(left, right))
        except ZeroDivisionError:
            raise ToolFailure("division by zero") from None
        except OverflowError:
            raise ToolFailure(f"result is too large (limit {MAX_MAGNITUDE:g} in magnitude)") from None
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -_evaluate(node.operand, depth + 1)
        if isinstance(node.op, ast.UAdd):
            return +_evaluate(node.operand, depth + 1)
        raise ToolFailure(f"unsupported operator {_UNSUPPORTED_OPERATORS.get(type(node.op), '?')}")
    if isinstance(node, ast.Call):
        return _call(node, depth)
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if node.id in _FUNCTIONS:
            raise ToolFailure(f"{node.id} is a function; call it like {node.id}(x)")
        raise ToolFailure(f"unknown name {node.id!r}; allowed constants: {', '.join(_CONSTANTS)}")
    raise _unsupported(node)


def evaluate(expression: str) -> Number:
    """The value of `expression`; an int only where every step was integer arithmetic.
    Raises ToolFailure for anything else than bounded real arithmetic."""
    text = expression.strip()
    if not text:
        raise ToolFailure("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolFailure(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ToolFailure(f"not a valid expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ToolFailure("not a valid expression") from None
    return _evaluate(tree.body, 0)


class Calculator(Tool[CalculatorArgs]):
    name = "calculator"
    description = (
        "Evaluate an arithmetic expression. Supports + - * / // % ** and parentheses, "
        f"the functions {', '.join(_FUNCTIONS)} (radians for trigonometry) and the constants pi and e."
    )
    Arguments = CalculatorArgs
    instructions = "Use calculator for arithmetic rather than computing results yourself."
    example = ("What is 3 * (4 + 5)?", {"expression": "3 * (4 + 5)"})

    async def execute(self, args: CalculatorArgs) -> JSONValue:
        return {"expression": args.expression, "result": evaluate(args.expression)}
