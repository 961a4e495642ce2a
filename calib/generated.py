"""Calibration text made by k2quant itself, to widen the hand-written set at no download:
worked math problems and agentic transcripts in English and Chinese (generated from
templates with a fixed seed, so identical on every machine), and k2quant's own Python
source as code. Calibration only needs activations that resemble real use (numbers,
formulas, tool calls and JSON, code), not literature.
"""

from __future__ import annotations

import json
import random
from importlib import resources

from k2quant.formats.tokenizer import render_chat

_NAMES_EN = ["Ada", "Ben", "Chloe", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Luis"]
_NAMES_ZH = ["小明", "小红", "王芳", "李雷", "韩梅梅", "张伟", "陈静", "刘洋", "赵磊", "孙丽"]
_ITEMS_EN = [("apples", 0.45), ("notebooks", 2.3), ("train tickets", 12.5), ("bags of rice", 8.75), ("pens", 1.2)]
_ITEMS_ZH = [("苹果", 3.5), ("笔记本", 12.0), ("火车票", 85.0), ("大米", 46.5), ("钢笔", 9.8)]
_CITIES = [("Lisbon", "里斯本"), ("Nairobi", "内罗毕"), ("Osaka", "大阪"), ("Quito", "基多"), ("Tromsø", "特罗姆瑟"),
           ("Chengdu", "成都"), ("Hangzhou", "杭州"), ("Reykjavik", "雷克雅未克")]  # fmt: skip


def _math_en(r: random.Random) -> str:
    kind = r.randrange(5)
    if kind == 0:
        name = r.choice(_NAMES_EN)
        item, price = r.choice(_ITEMS_EN)
        n = r.randint(3, 40)
        paid = (int(n * price) // 10 + 1) * 10
        total = round(n * price, 2)
        return (f"Problem: {name} buys {n} {item} at ${price:.2f} each and pays with ${paid}. How much change?\n"
                f"Solution: The cost is {n} x {price:.2f} = {total:.2f}. The change is {paid} - {total:.2f} = "
                f"{paid - total:.2f} dollars.\n")  # fmt: skip
    if kind == 1:
        a, b = r.randint(2, 12), r.randint(-30, 30)
        x = r.randint(-20, 20)
        c = a * x + b
        return (f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {c}.\n"
                f"Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {x}. "
                f"Check: {a}*({x}) + ({b}) = {c}.\n")  # fmt: skip
    if kind == 2:
        w, h = r.randint(3, 60), r.randint(3, 60)
        return (f"A rectangle is {w} m wide and {h} m long. Its area is {w} * {h} = {w * h} m^2 and its perimeter "
                f"is 2 * ({w} + {h}) = {2 * (w + h)} m. The diagonal is sqrt({w}^2 + {h}^2) = "
                f"sqrt({w * w + h * h}) ≈ {(w * w + h * h) ** 0.5:.3f} m.\n")  # fmt: skip
    if kind == 3:
        p, q = r.randint(2, 9), r.randint(2, 9)
        return (f"Expand (x + {p})(x - {q}): x^2 - {q}x + {p}x - {p * q} = x^2 {'+' if p - q >= 0 else '-'} "
                f"{abs(p - q)}x - {p * q}. Its roots are x = -{p} and x = {q}; their sum {q - p} equals minus the "
                f"linear coefficient and their product {-p * q} equals the constant term.\n")  # fmt: skip
    n = r.randint(5, 15)
    xs = [r.randint(1, 99) for _ in range(n)]
    mean = sum(xs) / n
    var = sum((v - mean) ** 2 for v in xs) / n
    return (f"Data: {', '.join(map(str, xs))}. n = {n}, sum = {sum(xs)}, mean = {mean:.3f}, "
            f"variance = {var:.3f}, standard deviation = {var ** 0.5:.3f}, median = "
            f"{sorted(xs)[n // 2] if n % 2 else (sorted(xs)[n // 2 - 1] + sorted(xs)[n // 2]) / 2}.\n")  # fmt: skip


def _math_zh(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        name = r.choice(_NAMES_ZH)
        item, price = r.choice(_ITEMS_ZH)
        n = r.randint(2, 30)
        total = round(n * price, 2)
        return (f"题目：{name}买了{n}份{item}，每份{price:.1f}元，一共要付多少钱？\n"
                f"解答：总价 = {n} × {price:.1f} = {total:.1f}（元）。答：一共{total:.1f}元。\n")  # fmt: skip
    if kind == 1:
        v, t = r.randint(40, 120), r.randint(2, 9)
        return (f"题目：一辆汽车以每小时{v}千米的速度行驶了{t}小时，行驶了多少千米？\n"
                f"解答：路程 = 速度 × 时间 = {v} × {t} = {v * t}（千米）。\n")  # fmt: skip
    a, b = r.randint(10, 99), r.randint(10, 99)
    return (f"计算：{a} × {b} = {a * b}。验算：{a * b} ÷ {b} = {a}。"
            f"{a}与{b}的最大公约数是{_gcd(a, b)}，最小公倍数是{a * b // _gcd(a, b)}。\n")  # fmt: skip


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def math_documents(n: int = 400, seed: int = 7) -> list[str]:
    """Worked problems, about 3 in 4 English, grouped ten to a document."""
    r = random.Random(seed)
    lines = [(_math_zh if r.random() < 0.25 else _math_en)(r) for _ in range(n)]
    return ["\n".join(lines[i : i + 10]) for i in range(0, n, 10)]


_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
     "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_files", "description": "Find files whose names match a glob",
     "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}, "max_results": {
     "type": "integer"}}, "required": ["pattern"]}}},
    {"type": "function", "function": {"name": "run_sql", "description": "Run a read-only SQL query",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]  # fmt: skip


def _transcript(r: random.Random, i: int) -> dict:
    zh = r.random() < 0.35
    kind = r.randrange(3)
    cid = f"functions.{_TOOLS[kind]['function']['name']}:{i}"
    if kind == 0:
        en, zh_city = r.choice(_CITIES)
        temp = r.randint(-15, 38)
        args = {"city": en, "unit": "celsius"}
        result = {"city": en, "temperature": temp, "condition": r.choice(["clear", "rain", "fog", "snow", "wind"])}
        ask = f"{zh_city}现在天气怎么样？" if zh else f"What's the weather like in {en} right now?"
        answer = (f"{zh_city}现在{temp}°C，天气{result['condition']}。" if zh
                  else f"It is {temp} °C in {en} with {result['condition']}.")  # fmt: skip
    elif kind == 1:
        ext = r.choice(["py", "md", "toml", "json", "safetensors"])
        files = [f"src/module_{r.randint(1, 99)}.{ext}" for _ in range(r.randint(1, 4))]
        args = {"pattern": f"**/*.{ext}", "max_results": 20}
        result = {"files": files}
        ask = f"帮我找出所有 .{ext} 文件。" if zh else f"List every .{ext} file in the project."
        answer = ("找到这些文件：" if zh else "Found: ") + ", ".join(files)
    else:
        table = r.choice(["orders", "experts", "layers", "runs"])
        limit = r.randint(3, 10)
        args = {"query": f"SELECT id, name, score FROM {table} ORDER BY score DESC LIMIT {limit}"}
        rows = [[k, f"{table[:-1]}_{k}", round(r.random(), 3)] for k in range(1, limit + 1)]
        result = {"rows": rows}
        ask = f"{table}表里得分最高的{limit}条是什么？" if zh else f"Which {limit} {table} have the highest score?"
        answer = (f"得分最高的是 {rows[0][1]}（{rows[0][2]}）。" if zh
                  else f"The top one is {rows[0][1]} with score {rows[0][2]}.")  # fmt: skip
    messages = [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": _TOOLS[kind]["function"]["name"],
                                                         "arguments": json.dumps(args, ensure_ascii=False)}}]},
        {"role": "tool", "tool_call_id": cid, "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]  # fmt: skip
    others = [t for j, t in enumerate(_TOOLS) if j != kind and r.random() < 0.3]
    return {"messages": messages, "tools": [_TOOLS[kind], *others]}


def agentic_documents(n: int = 120, seed: int = 11) -> list[str]:
    """Tool-using conversations in K2's chat format (declarations, calls, results, answers)."""
    r = random.Random(seed)
    return [render_chat(**_transcript(r, i), add_generation_prompt=False) for i in range(n)]


def code_documents(max_bytes: int = 100_000) -> list[str]:
    """k2quant's own source files (original code written for the project), in a fixed order,
    up to about `max_bytes` so that code does not outweigh the rest of the set."""
    docs, size = [], 0
    for pkg in ("k2quant.quant", "k2quant.formats", "k2quant.calib", "k2quant.report", "k2quant"):
        root = resources.files(pkg)
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".py") and entry.is_file() and size < max_bytes:
                text = entry.read_text(encoding="utf-8")
                docs.append(text)
                size += len(text.encode())
    return docs
