"""The Helm chart in helm/dask-provisioner: metadata, schema, templates, and what they render.

No `helm` binary is needed (nor assumed): the templates are rendered by a small interpreter
of the Go-template subset the chart uses (actions with trim markers, if/else if/else, with,
range, define/include, variables, pipelines and the Sprig functions listed in ``FUNCTIONS``).
It is stricter than Helm where that catches bugs: reading a key that does not exist, printing
a map or list without ``toYaml``, or calling an unknown function is an error. Values files
are merged onto values.yaml and validated with values.schema.json, as Helm does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "dask-provisioner"
TEMPLATES = CHART / "templates"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
EXPECTED_TEMPLATES = [
    "_helpers.tpl",
    "NOTES.txt",
    "deployment.yaml",
    "service.yaml",
    "serviceaccount.yaml",
    "secret-tenants.yaml",
    "secret-state.yaml",
    "pvc.yaml",
    "servicemonitor.yaml",
]


# --------------------------------------------------------------------------------------------
# A Go-template interpreter, just big enough for this chart
# --------------------------------------------------------------------------------------------


class RenderError(Exception):
    """A template cannot be parsed or rendered (or it called ``fail``/``required``)."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<decl>:=)
    | (?P<assign>=)
    | (?P<lp>\()
    | (?P<rp>\))
    | (?P<pipe>\|)
    | (?P<comma>,)
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise RenderError(f"cannot read {text[pos:]!r} in action {text!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    """Tokens of one action -> a pipeline: ([declared vars], is_decl, [commands])."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens, self.pos = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise RenderError("unexpected end of action")
        self.pos += 1
        return token

    def pipeline(self, allow_decl: bool = True) -> tuple:
        names: list[str] = []
        op = None
        if allow_decl:
            # "$x :=", "$x =", "$k, $v :="
            save = self.pos
            while (token := self.peek()) and token[0] == "var":
                names.append(self.take()[1])
                if (token := self.peek()) and token[0] == "comma":
                    self.take()
                    continue
                break
            if names and (token := self.peek()) and token[0] in ("decl", "assign"):
                op = self.take()[0]
            else:
                names, self.pos = [], save
        commands = [self.command()]
        while (token := self.peek()) and token[0] == "pipe":
            self.take()
            commands.append(self.command())
        return (names, op, commands)

    def command(self) -> list:
        operands = []
        while (token := self.peek()) and token[0] not in ("pipe", "rp"):
            operands.append(self.operand())
        if not operands:
            raise RenderError("empty command")
        return operands

    def operand(self) -> tuple:
        kind, text = self.take()
        if kind == "lp":
            inner = self.pipeline(allow_decl=False)
            if self.take()[0] != "rp":
                raise RenderError("missing )")
            return ("pipe", inner)
        if kind == "str":
            return ("lit", json.loads(text))
        if kind == "raw":
            return ("lit", text[1:-1])
        if kind == "num":
            return ("lit", float(text) if "." in text else int(text))
        if kind == "ident" and text in ("true", "false", "nil"):
            return ("lit", {"true": True, "false": False, "nil": None}[text])
        if kind in ("ident", "field", "var"):
            return (kind, text)
        raise RenderError(f"unexpected {text!r}")


def _parse_pipeline(text: str) -> tuple:
    parser = _Parser(_tokenize(text))
    result = parser.pipeline()
    if parser.peek() is not None:
        raise RenderError(f"unexpected {parser.peek()[1]!r} in {text!r}")
    return result


def _lex(source: str) -> list[tuple[str, str]]:
    """Text and actions, with {{- and -}} whitespace trimming applied."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[pos : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        trim_next, pos = bool(match.group(3)), match.end()
    tail = source[pos:]
    items.append(("text", tail.lstrip() if trim_next else tail))
    if "{{" in tail or "}}" in tail:
        raise RenderError("unbalanced {{ }} delimiters")
    return items


_BLOCKS = ("if", "with", "range", "define")


def _parse(source: str, defines: dict[str, list]) -> list:
    """Nodes: ('text', s) | ('out', pipe) | ('if'/'with', [(pipe, body)...], else) |
    ('range', pipe, body, else) | ('template', name, pipe)."""
    root: list = []
    stack: list[tuple[str, Any, list]] = []  # (keyword, node-in-progress, current body)
    body = root
    for kind, text in _lex(source):
        if kind == "text":
            if text:
                body.append(("text", text))
            continue
        if text.startswith("/*"):
            if not text.endswith("*/"):
                raise RenderError(f"unterminated comment {text!r}")
            continue
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        if word in ("if", "with"):
            node = [word, [(_parse_pipeline(rest), [])], None]
            body.append(node)
            stack.append((word, node, body))
            body = node[1][0][1]
        elif word == "range":
            node = ["range", _parse_pipeline(rest), [], None]
            body.append(node)
            stack.append((word, node, body))
            body = node[2]
        elif word == "define":
            name = json.loads(rest)
            node = ["define", name, []]
            stack.append((word, node, body))
            body = node[2]
        elif word == "else":
            if not stack or stack[-1][0] not in ("if", "with", "range"):
                raise RenderError("else outside if/with/range")
            keyword, node, _ = stack[-1]
            if rest.startswith("if ") and keyword == "if":
                node[1].append((_parse_pipeline(rest[3:]), []))
                body = node[1][-1][1]
            elif rest:
                raise RenderError(f"unsupported else {rest!r}")
            else:
                node[-1] = []
                body = node[-1]
        elif word == "end":
            if not stack:
                raise RenderError("end without a block")
            keyword, node, body = stack.pop()
            if keyword == "define":
                defines[node[1]] = node[2]
        elif word == "template":
            name, _, arg = rest.partition(" ")
            body.append(("template", json.loads(name), _parse_pipeline(arg or ".")))
        elif word in ("block", "break", "continue", "tpl"):
            raise RenderError(f"{word} is not supported by the test renderer")
        else:
            body.append(("out", _parse_pipeline(text)))
    if stack:
        raise RenderError(f"{stack[-1][0]} without end")
    return root


def _empty(value: Any) -> bool:
    return value is None or value is False or (not isinstance(value, bool) and not value)


def _go_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        raise RenderError(f"printing a {type(value).__name__} without toYaml: {value!r}")
    return str(value)


def _printf(fmt: str, *args: Any) -> str:
    values = iter(args)

    def one(match: re.Match) -> str:
        verb = match.group(1)
        if verb == "%":
            return "%"
        value = next(values)
        if verb == "q":
            return json.dumps(_go_str(value))
        if verb == "d":
            return str(int(value))
        return _go_str(value)

    return re.sub(r"%([sqdv%])", one, fmt)


def _indent(width: int, text: str) -> str:
    pad = " " * width
    return pad + text.replace("\n", "\n" + pad)


def _to_yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=True)
    return text.rstrip("\n").removesuffix("\n...")


def _required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise RenderError(message)
    return value


def _fail(message: str) -> None:
    raise RenderError(message)


def _to_int(value: Any) -> int:
    if value is None or value == "":
        return 0
    return int(float(value)) if isinstance(value, str) else int(value)


def _and(*args: Any) -> Any:
    for arg in args:
        if _empty(arg):
            return arg
    return args[-1]


def _or(*args: Any) -> Any:
    for arg in args:
        if not _empty(arg):
            return arg
    return args[-1]


def _print(*args: Any) -> str:
    out = ""
    for index, arg in enumerate(args):
        if index and not isinstance(arg, str) and not isinstance(args[index - 1], str):
            out += " "
        out += _go_str(arg)
    return out


FUNCTIONS = {
    "and": _and,
    "or": _or,
    "not": _empty,
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "lt": lambda a, b: a < b,
    "ge": lambda a, b: a >= b,
    "le": lambda a, b: a <= b,
    "len": len,
    "int": _to_int,
    "min": lambda *xs: min(int(x) for x in xs),
    "max": lambda *xs: max(int(x) for x in xs),
    "default": lambda fallback, value=None: fallback if _empty(value) else value,
    "empty": _empty,
    "quote": lambda *xs: " ".join(json.dumps(_go_str(x)) for x in xs if x is not None),
    "printf": _printf,
    "print": _print,
    "trunc": lambda n, s: s[:n] if n >= 0 else s[n:],
    "trimSuffix": lambda suffix, s: s.removesuffix(suffix),
    "trimPrefix": lambda prefix, s: s.removeprefix(prefix),
    "replace": lambda old, new, s: s.replace(old, new),
    "contains": lambda sub, s: sub in s,
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "toYaml": _to_yaml,
    "indent": _indent,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "required": _required,
    "fail": _fail,
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
}


class Renderer:
    """Renders the chart's templates for given values, as `helm template` would."""

    def __init__(self, chart: Path = CHART) -> None:
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        self.chart = {"Name": meta["name"], "Version": meta["version"],
                      "AppVersion": meta.get("appVersion", "")}
        self.base = f"{meta['name']}/templates"
        self.defines: dict[str, list] = {}
        self.files: dict[str, list] = {}
        for path in sorted((chart / "templates").iterdir()):
            name = f"{self.base}/{path.name}"
            self.files[name] = _parse(path.read_text(), self.defines)
            self.defines[name] = self.files[name]
        self.defaults = yaml.safe_load((chart / "values.yaml").read_text())

    def context(self, values: dict, release: str = "prov", namespace: str = "tenants") -> dict:
        return {
            "Values": merge(self.defaults, values),
            "Chart": self.chart,
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm",
                        "IsInstall": True, "IsUpgrade": False, "Revision": 1},
            "Capabilities": {},
            "Template": {"BasePath": self.base, "Name": ""},
        }

    def render(self, values: dict | None = None, **release: str) -> dict[str, str]:
        """{file name: rendered text} for every template that is not a helper."""
        ctx = self.context(values or {}, **release)
        out = {}
        for name, nodes in self.files.items():
            short = name.rsplit("/", 1)[1]
            if short.startswith("_"):
                continue
            ctx["Template"] = {**ctx["Template"], "Name": name}
            out[short] = self._nodes(nodes, ctx, [{"$": ctx}])
        return out

    def manifests(self, values: dict | None = None) -> list[dict]:
        docs = []
        for name, text in self.render(values).items():
            if name.endswith(".yaml"):
                try:
                    docs.extend(d for d in yaml.safe_load_all(text) if d is not None)
                except yaml.YAMLError as exc:
                    raise AssertionError(f"{name} renders to invalid YAML:\n{text}") from exc
        return docs

    # -- evaluation --

    def _nodes(self, nodes: list, dot: Any, scopes: list[dict]) -> str:
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "out":
                value = self._pipeline(node[1], dot, scopes)
                if not node[1][1]:  # a declaration prints nothing
                    out.append(_go_str(value))
            elif kind in ("if", "with"):
                for pipe, body in node[1]:
                    value = self._pipeline(pipe, dot, scopes)
                    if not _empty(value):
                        inner = value if kind == "with" else dot
                        out.append(self._nodes(body, inner, [*scopes, {}]))
                        break
                else:
                    if node[2] is not None:
                        out.append(self._nodes(node[2], dot, [*scopes, {}]))
            elif kind == "range":
                names, _, _ = node[1]
                items = self._pipeline(node[1], dot, scopes, declare=False)
                pairs = (sorted(items.items()) if isinstance(items, dict)
                         else list(enumerate(items or [])))
                for key, item in pairs:
                    scope = {}
                    if len(names) == 1:
                        scope[names[0]] = item
                    elif len(names) == 2:
                        scope[names[0]], scope[names[1]] = key, item
                    out.append(self._nodes(node[2], item, [*scopes, scope]))
                if not pairs and node[3] is not None:
                    out.append(self._nodes(node[3], dot, [*scopes, {}]))
            elif kind == "template":
                out.append(self._include(node[1], self._pipeline(node[2], dot, scopes)))
            elif kind == "define":
                pass
            else:
                raise RenderError(f"unknown node {kind}")
        return "".join(out)

    def _include(self, name: str, dot: Any) -> str:
        if name not in self.defines:
            raise RenderError(f"no template named {name!r}")
        root = dot if isinstance(dot, dict) and "Values" in dot else {}
        return self._nodes(self.defines[name], dot, [{"$": root}])

    def _pipeline(self, pipe: tuple, dot: Any, scopes: list[dict], declare: bool = True) -> Any:
        names, op, commands = pipe
        value: Any = _NOTHING
        for command in commands:
            value = self._command(command, dot, scopes, value)
        if declare and op == "decl":
            scopes[-1][names[0]] = value
        elif declare and op == "assign":
            for scope in reversed(scopes):
                if names[0] in scope:
                    scope[names[0]] = value
                    break
            else:
                raise RenderError(f"assignment to undeclared {names[0]}")
        return value

    def _command(self, command: list, dot: Any, scopes: list[dict], piped: Any) -> Any:
        head = command[0]
        if head[0] == "ident":
            args = [self._operand(o, dot, scopes) for o in command[1:]]
            if piped is not _NOTHING:
                args.append(piped)
            if head[1] == "include":
                return self._include(*args)
            if head[1] not in FUNCTIONS:
                raise RenderError(f"function {head[1]!r} is not known to the test renderer")
            try:
                return FUNCTIONS[head[1]](*args)
            except RenderError:
                raise
            except Exception as exc:  # a wrong call is a template bug
                raise RenderError(f"{head[1]}{tuple(args)!r}: {exc}") from exc
        if len(command) != 1 or piped is not _NOTHING:
            raise RenderError(f"{head[1]!r} is not a function")
        return self._operand(head, dot, scopes)

    def _operand(self, operand: tuple, dot: Any, scopes: list[dict]) -> Any:
        kind, value = operand
        if kind == "lit":
            return value
        if kind == "pipe":
            return self._pipeline(value, dot, scopes, declare=False)
        if kind == "field":
            return dot if value == "." else _walk(dot, value[1:].split("."))
        if kind == "var":
            name, *path = value.split(".")
            for scope in reversed(scopes):
                if name in scope:
                    return _walk(scope[name], path)
            raise RenderError(f"undefined variable {name}")
        if kind == "ident":
            raise RenderError(f"function {value!r} used as a value")
        raise RenderError(f"unknown operand {operand!r}")


_NOTHING = object()


def _walk(value: Any, path: list[str]) -> Any:
    for index, key in enumerate(path):
        if not isinstance(value, dict):
            raise RenderError(f"cannot read .{key} of {value!r}")
        if key not in value:
            where = ".".join(path[: index + 1])
            raise RenderError(f"no key {key!r} (reading .{where}); is it in values.yaml?")
        value = value[key]
    return value


def merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of a values file onto the chart's defaults (null deletes a key)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="module")
def defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def validation_errors(schema: dict, values: dict) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft7Validator(schema).iter_errors(values))


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


def load_example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / name).read_text())


TENANT = {
    "name": "acme",
    "token_sha256": "ab" * 32,
    "quota": {"cores": 8, "memory": "16GiB", "clusters": 3, "workers_per_cluster": 6},
    "defaults": {"worker_cores": 1, "worker_memory": "2GiB", "idle_timeout": "30m",
                 "no_client_timeout": "10m"},
}


# --------------------------------------------------------------------------------------------
# Chart metadata and files
# --------------------------------------------------------------------------------------------


def test_chart_yaml_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "dask-provisioner" == CHART.name
    assert meta["type"] == "application"
    for key in ("version", "appVersion"):
        assert isinstance(meta[key], str), f"{key} must be a string (quote it)"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", meta["version"]), "SemVer 2"


@pytest.mark.parametrize("name", EXPECTED_TEMPLATES)
def test_expected_template_exists(name):
    assert (TEMPLATES / name).is_file()


def test_examples_are_shipped():
    names = {p.name for p in EXAMPLES}
    assert "mesos-postgres.yaml" in names and len(names) >= 2


def test_no_machine_paths_in_chart():
    # The folder this checkout lives in, and home folders, must never be baked into the chart.
    here = str(Path(__file__).resolve().parents[2]) + "/"
    for path in CHART.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert here not in text and "/home/" not in text, path


# --------------------------------------------------------------------------------------------
# values.schema.json
# --------------------------------------------------------------------------------------------


def test_schema_is_valid_draft7(schema):
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


def test_values_yaml_validates(schema, defaults):
    assert validation_errors(schema, defaults) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(schema, defaults, path):
    example = yaml.safe_load(path.read_text())
    assert validation_errors(schema, merge(defaults, example)) == []


def test_every_values_key_is_in_the_schema(schema, defaults):
    def walk(values: dict, node: dict, where: str) -> None:
        for key, value in values.items():
            props = node.get("properties", {})
            assert key in props, f"{where}{key} is in values.yaml but not in the schema"
            if isinstance(value, dict) and "properties" in props[key]:
                walk(value, props[key], f"{where}{key}.")

    walk(defaults, schema, "")


BAD_VALUES = {
    "backend not in the enum": ("backend: kubernetes\n", "backend"),
    "mesos backend without master": ("backend: mesos\n", "master"),
    "mesos master set to null": ("backend: mesos\nmesos: {master: null}\n", "master"),
    "mesos master not host:port or zk://": ("backend: mesos\nmesos: {master: 'http://m'}\n",
                                            "master"),
    "negative service port": ("service: {port: -1}\n", "port"),
    "server port too large": ("server: {port: 70000}\n", "port"),
    "port as a string": ("service: {port: '8000'}\n", "port"),
    "two replicas on sqlite": ("replicaCount: 2\n", "replicaCount"),
    "postgresql without url or secret": ("state: {type: postgresql}\n", "postgresql"),
    "state type not in the enum": ("state: {type: mysql}\n", "type"),
    "typo in a top-level key": ("replicas: 1\n", "replicas"),
    "typo in a nested key": ("persistence: {enable: true}\n", "enable"),
    "pull policy not in the enum": ("image: {pullPolicy: Sometimes}\n", "pullPolicy"),
    "tenant token not a sha256": (
        "tenants:\n  items:\n    - name: acme\n      token_sha256: secret\n"
        "      quota: {cores: 1, memory: 1GiB}\n",
        "token_sha256",
    ),
    "tenant without quota": (
        f"tenants:\n  items:\n    - {{name: acme, token_sha256: '{'ab' * 32}'}}\n", "quota"),
    "tenant quota with unknown unit": (
        "tenants:\n  items:\n    - name: acme\n      token_sha256: " + "ab" * 32
        + "\n      quota: {cores: 1, memory: 2 lots}\n",
        "memory",
    ),
    "tenant name not a DNS label": (
        "tenants:\n  items:\n    - name: Acme_Corp\n      token_sha256: " + "ab" * 32
        + "\n      quota: {cores: 1, memory: 1GiB}\n",
        "name",
    ),
    "tenants as a map": ("tenants: {items: {acme: {}}}\n", "items"),
    "metrics token Secret without a key": (
        "metricsToken: {existingSecret: prov-metrics, secretKey: ''}\n", "secretKey"),
    "metrics token Secret name not a DNS name": (
        "metricsToken: {existingSecret: Prov_Metrics}\n", "existingSecret"),
    "metrics token given in values": ("metricsToken: {token: s3cret}\n", "token"),
    "postgresql on an emptyDir without the encryption key's Secret": (
        "state: {type: postgresql, postgresql: {existingSecret: db}}\n"
        "persistence: {enabled: false}\n", "existingSecret"),
    "encryption key given in values": ("encryptionKey: {key: s3cret}\n", "key"),
}


@pytest.mark.parametrize("text,field", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected(schema, defaults, text, field):
    errors = validation_errors(schema, merge(defaults, yaml.safe_load(text)))
    assert errors, "the schema accepted bad values"
    described = " ".join(
        f"{'.'.join(map(str, e.absolute_path))} {e.message} "
        + " ".join(f"{'.'.join(map(str, c.absolute_path))} {c.message}" for c in e.context or [])
        for e in errors
    )
    assert field in described, described


def test_mesos_master_forms_are_accepted(schema, defaults):
    for master in ("mesos-master:5050", "10.0.0.5:5050", "zk://zk:2181/mesos",
                   "zk://a:2181,b:2181,c:2181/mesos"):
        values = merge(defaults, {"backend": "mesos", "mesos": {"master": master}})
        assert validation_errors(schema, values) == [], master


def test_tenant_schema_matches_the_service(schema):
    """The schema's tenant fields are those the service's tenants file accepts."""
    from provisioner import tenants

    tenant = schema["properties"]["tenants"]["properties"]["items"]["items"]
    props = tenant["properties"]
    assert set(props) == set(tenants.Tenant.model_fields)
    assert set(props["quota"]["properties"]) == set(tenants.Quota.model_fields)
    assert set(props["defaults"]["properties"]) == set(tenants.Defaults.model_fields)
    required = {n for n, f in tenants.Tenant.model_fields.items() if f.is_required()}
    assert set(tenant["required"]) == required


# --------------------------------------------------------------------------------------------
# Templates, statically
# --------------------------------------------------------------------------------------------


def _template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.is_file())


@pytest.mark.parametrize("path", _template_files(), ids=lambda p: p.name)
def test_template_delimiters_are_balanced(path):
    text = path.read_text()
    depth = 0
    for match in re.finditer(r"\{\{|\}\}", text):
        depth += 1 if match.group() == "{{" else -1
        assert depth in (0, 1), f"nested or stray delimiter at offset {match.start()}"
    assert depth == 0, "an action is not closed"


@pytest.mark.parametrize("path", _template_files(), ids=lambda p: p.name)
def test_template_blocks_parse(path):
    _parse(path.read_text(), {})  # if/with/range/define each closed by end


def test_every_values_path_in_templates_exists(defaults):
    missing = []
    for path in _template_files():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()):
            node: Any = defaults
            for key in match.group(1)[1:].split("."):
                if not isinstance(node, dict) or key not in node:
                    missing.append(f"{path.name}: .Values{match.group(1)}")
                    break
                node = node[key]
    assert missing == []


def test_every_top_level_value_is_used(defaults):
    text = "".join(p.read_text() for p in _template_files())
    unused = [k for k in defaults if not re.search(rf"\.Values\.{k}\b", text)]
    assert unused == []


def test_deployment_probes_ask_livez_and_healthz():
    """Liveness: the process answers (a standby does); readiness: it serves requests."""
    text = (TEMPLATES / "deployment.yaml").read_text()
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
        block = text.split(f"{probe}:", 1)[1].split("Probe:", 1)[0]
        assert f"path: {path}" in block, probe


# --------------------------------------------------------------------------------------------
# The renderer itself (so that what it says about the chart can be trusted)
# --------------------------------------------------------------------------------------------


RENDERER_CASES = [
    ("a {{- \" b \" -}} c", {}, "a b c"),
    ("{{ if .x }}yes{{ else if .y }}maybe{{ else }}no{{ end }}", {"x": 0, "y": "1"}, "maybe"),
    ("{{ with .m }}{{ .k }}{{ else }}none{{ end }}", {"m": {}}, "none"),
    ("{{ range $i, $v := .l }}{{ $i }}={{ $v }};{{ end }}", {"l": ["a", "b"]}, "0=a;1=b;"),
    ("{{ $n := default \"d\" .e }}{{ $n | quote }}", {"e": ""}, '"d"'),
    ("{{ printf \"%s-%s\" .a .b | trunc 3 | trimSuffix \"-\" }}", {"a": "ab", "b": "c"}, "ab"),
    ("x:{{ toYaml .m | nindent 2 }}", {"m": {"b": 1, "a": [1]}}, "x:\n  a:\n  - 1\n  b: 1"),
    ("{{ and .a (not .b) }} {{ or .b .c }}", {"a": 1, "b": None, "c": "z"}, "true z"),
]


@pytest.mark.parametrize("source,dot,expected", RENDERER_CASES)
def test_renderer_follows_go_template_semantics(source, dot, expected):
    r = Renderer.__new__(Renderer)
    r.defines = {}
    assert r._nodes(_parse(source, r.defines), dot, [{"$": dot}]) == expected


def test_renderer_is_strict():
    r = Renderer.__new__(Renderer)
    r.defines = {}
    for source, dot in [("{{ .missing }}", {}), ("{{ .m }}", {"m": {"a": 1}}),
                        ("{{ nosuchfn 1 }}", {}), ("{{ if .x }}", {"x": 1})]:
        with pytest.raises(RenderError):
            r._nodes(_parse(source, r.defines), dot, [{"$": dot}])


# --------------------------------------------------------------------------------------------
# What the chart renders
# --------------------------------------------------------------------------------------------


def test_default_render(renderer, defaults):
    docs = renderer.manifests()
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"]
    for doc in docs:
        assert doc["metadata"]["name"].startswith("prov-dask-provisioner")
        assert doc["metadata"]["namespace"] == "tenants"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "prov"

    deploy = one(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    c = container(docs)
    assert c["image"] == "dask-provisioner:0.1.0"
    assert c["command"] == ["provisioner", "serve"]
    args = c["args"]
    assert args[:4] == ["--host", "0.0.0.0", "--port", "8000"]
    assert args[args.index("--backend") + 1] == "local"
    assert args[args.index("--data-dir") + 1] == "/var/lib/provisioner"
    assert "--mesos-master" not in args and "--tenants" not in args
    assert "--keep-clusters" not in args and "--no-tls" not in args
    assert env_of(c)["PROVISIONER_STATE"] == {
        "name": "PROVISIONER_STATE", "value": "sqlite:////var/lib/provisioner/provisioner.db"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTP"}
    assert "--standby" not in args
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] == defaults["resources"]["requests"]

    pod = spec["template"]["spec"]
    pvc = one(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in pvc["spec"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"data": "/var/lib/provisioner", "tmp": "/tmp"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert key not in pod

    service = one(docs, "Service")
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_mesos_postgres_example_render(renderer):
    example = load_example("mesos-postgres.yaml")
    docs = renderer.manifests(example)
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "Service", "ServiceAccount", "ServiceMonitor"]

    c = container(docs)
    args = c["args"]
    assert args[args.index("--backend") + 1] == "mesos"
    assert args[args.index("--mesos-master") + 1] == example["mesos"]["master"]
    assert args[args.index("--tenants") + 1] == "/etc/provisioner/tenants.yaml"
    state = env_of(c)["PROVISIONER_STATE"]
    assert "value" not in state
    assert state["valueFrom"] == {"secretKeyRef": {"name": "provisioner-db", "key": "url"}}

    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert volumes["tenants"]["secret"] == {
        "secretName": "provisioner-tenants",
        "items": [{"key": "tenants.yaml", "path": "tenants.yaml"}]}
    mount = {"name": "tenants", "mountPath": "/etc/provisioner", "readOnly": True}
    assert mount in c["volumeMounts"]
    assert pod["nodeSelector"] == example["nodeSelector"]
    assert pod["tolerations"] == example["tolerations"]
    assert c["resources"] == example["resources"]
    assert c["image"] == "registry.example.internal/dask-provisioner:0.1.0"

    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "scheme": "http", "interval": "30s",
         "scrapeTimeout": "10s", "authorization": {
             "type": "Bearer", "credentials": {"name": "provisioner-metrics", "key": "token"}}}]
    # No volume for the data folder: the key sealing credentials in PostgreSQL is a Secret's.
    assert env_of(c)["PROVISIONER_SECRET_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "provisioner-key", "key": "key"}}
    service = one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["tenants"]}


def test_local_sqlite_example_tenants_secret(renderer, tmp_path):
    example = load_example("local-sqlite.yaml")
    docs = renderer.manifests(example)
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "prov-dask-provisioner-tenants"
    tenants_file = secret["stringData"]["tenants.yaml"]
    assert yaml.safe_load(tenants_file) == {"tenants": example["tenants"]["items"]}

    c = container(docs)
    assert c["args"][c["args"].index("--tenants") + 1] == "/etc/provisioner/tenants.yaml"
    pod = one(docs, "Deployment")["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["tenants"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/tenants"])

    # The file the chart writes is one the service accepts.
    from provisioner import tenants

    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_file)
    assert [t.name for t in tenants.load_tenants(path)] == ["acme", "research"]


def test_tenants_change_restarts_the_pod(renderer):
    def checksum(items: list) -> str:
        docs = renderer.manifests({"tenants": {"items": items}})
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/tenants"]

    changed = merge(TENANT, {"quota": {"cores": 16}})
    assert checksum([TENANT]) != checksum([changed])


def test_existing_tenants_secret_wins(renderer):
    docs = renderer.manifests({"tenants": {"existingSecret": "mine", "secretKey": "t.yaml",
                                           "items": [TENANT]}})
    assert "Secret" not in [d["kind"] for d in docs]
    pod = one(docs, "Deployment")["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["tenants"]["secret"] == {
        "secretName": "mine", "items": [{"key": "t.yaml", "path": "tenants.yaml"}]}
    assert "annotations" not in pod["metadata"]


def test_postgres_url_from_values_goes_through_a_secret(renderer):
    url = "postgresql://prov:s3cret-pw@db:5432/prov"
    rendered = renderer.render({"state": {"type": "postgresql", "postgresql": {"url": url}},
                                "replicaCount": 2, "updateStrategy": "RollingUpdate"})
    assert url not in rendered["deployment.yaml"] and "s3cret" not in rendered["NOTES.txt"]
    docs = renderer.manifests({"state": {"type": "postgresql", "postgresql": {"url": url}},
                               "replicaCount": 2, "updateStrategy": "RollingUpdate"})
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "prov-dask-provisioner-state"
    assert secret["stringData"] == {"url": url}
    assert env_of(container(docs))["PROVISIONER_STATE"]["valueFrom"] == {
        "secretKeyRef": {"name": "prov-dask-provisioner-state", "key": "url"}}
    spec = one(docs, "Deployment")["spec"]
    assert spec["replicas"] == 2 and spec["strategy"] == {"type": "RollingUpdate"}
    # Two replicas: every pod stands by, one takes the lease and serves.
    assert "--standby" in container(docs)["args"]


def test_metrics_token_secret_reaches_the_service_and_prometheus(renderer, schema, defaults,
                                                                 monkeypatch):
    """With the token set, /metrics answers 401 to a ServiceMonitor that does not send it."""
    values = {"metricsToken": {"existingSecret": "prov-metrics", "secretKey": "bearer"},
              "serviceMonitor": {"enabled": True}}
    assert validation_errors(schema, merge(defaults, values)) == []
    docs = renderer.manifests(values)
    assert "Secret" not in [d["kind"] for d in docs]  # the chart never holds the token

    env = env_of(container(docs))["PROVISIONER_METRICS_TOKEN"]
    assert env == {"name": "PROVISIONER_METRICS_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "prov-metrics", "key": "bearer"}}}
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer", "credentials": {"name": "prov-metrics", "key": "bearer"}}
    assert endpoint["path"] == "/metrics" and "bearerTokenSecret" not in endpoint

    # Without a ServiceMonitor the service is still guarded.
    values["serviceMonitor"]["enabled"] = False
    docs = renderer.manifests(values)
    assert "ServiceMonitor" not in [d["kind"] for d in docs]
    assert env_of(container(docs))["PROVISIONER_METRICS_TOKEN"] == env

    # The variable the chart sets is the one the service reads.
    from provisioner.settings import Settings

    monkeypatch.setenv(env["name"], "from-the-secret")
    assert Settings().metrics_token == "from-the-secret"


def test_no_metrics_token_by_default(renderer):
    docs = renderer.manifests({"serviceMonitor": {"enabled": True}})
    assert "PROVISIONER_METRICS_TOKEN" not in env_of(container(docs))
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in endpoint and "bearerTokenSecret" not in endpoint
    text = "".join(renderer.render({"serviceMonitor": {"enabled": True}}).values())
    assert "METRICS_TOKEN" not in text and "authorization" not in text


def test_without_a_metrics_token_secret_notes_say_where_the_token_is_and_warn_prometheus(
        renderer):
    """/metrics is never open: without a Secret the service makes its own token, which a
    ServiceMonitor cannot know."""
    notes = renderer.render({"serviceMonitor": {"enabled": True}})["NOTES.txt"]
    assert "cat /var/lib/provisioner/metrics-token" in notes
    assert "WARNING: that ServiceMonitor has no token" in notes
    notes = renderer.render({})["NOTES.txt"]
    assert "cat /var/lib/provisioner/metrics-token" in notes and "WARNING: that" not in notes
    notes = renderer.render({"serviceMonitor": {"enabled": True}, "metricsToken": {
        "existingSecret": "prov-metrics", "secretKey": "token"}})["NOTES.txt"]
    assert "Secret prov-metrics" in notes and "WARNING: that" not in notes
    assert "metrics-token" not in notes


def test_encryption_key_secret_reaches_the_service(renderer, schema, defaults, monkeypatch):
    values = {"encryptionKey": {"existingSecret": "prov-key", "secretKey": "fernet"}}
    assert validation_errors(schema, merge(defaults, values)) == []
    docs = renderer.manifests(values)
    assert "Secret" not in [d["kind"] for d in docs]  # the chart never holds the key
    env = env_of(container(docs))["PROVISIONER_SECRET_KEY"]
    assert env == {"name": "PROVISIONER_SECRET_KEY", "valueFrom": {
        "secretKeyRef": {"name": "prov-key", "key": "fernet"}}}
    assert "PROVISIONER_SECRET_KEY" not in env_of(container(renderer.manifests({})))
    # PostgreSQL state on a persistent volume may keep the key file there.
    pg = {"state": {"type": "postgresql", "postgresql": {"existingSecret": "db"}}}
    assert validation_errors(schema, merge(defaults, pg)) == []
    renderer.manifests(pg)

    from provisioner.settings import Settings

    monkeypatch.setenv(env["name"], "from-the-secret")
    assert Settings().secret_key.get_secret_value() == "from-the-secret"


def test_sqlite_always_recreate_even_if_asked_otherwise(renderer):
    spec = one(renderer.manifests({"updateStrategy": "RollingUpdate"}), "Deployment")["spec"]
    assert spec["strategy"] == {"type": "Recreate"} and spec["replicas"] == 1


def test_flags_and_extras(renderer):
    docs = renderer.manifests({
        "server": {"keepClusters": True, "tls": False, "port": 9000, "dataDir": "/data/",
                   "extraArgs": ["--log-level", "debug"],
                   "extraEnv": [{"name": "PROVISIONER_X", "value": "1"}]},
        "service": {"port": 80, "type": "NodePort"},
        "persistence": {"storageClass": "-", "existingClaim": ""},
        "fullnameOverride": "provisioner",
        "image": {"tag": "dev"},
    })
    c = container(docs)
    assert c["args"][-4:] == ["--keep-clusters", "--no-tls", "--log-level", "debug"]
    assert c["args"][c["args"].index("--port") + 1] == "9000"
    assert c["ports"][0]["containerPort"] == 9000
    assert env_of(c)["PROVISIONER_X"] == {"name": "PROVISIONER_X", "value": "1"}
    assert env_of(c)["PROVISIONER_STATE"]["value"] == "sqlite:////data/provisioner.db"
    assert c["image"] == "dask-provisioner:dev"
    assert one(docs, "PersistentVolumeClaim")["spec"]["storageClassName"] == ""
    service = one(docs, "Service")
    assert service["metadata"]["name"] == "provisioner"
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["port"] == 80


def test_public_url_reaches_the_service(renderer, schema, defaults):
    """Behind an Ingress, dashboard links are built on the public origin."""
    assert "PROVISIONER_PUBLIC_URL" not in env_of(container(renderer.manifests({})))
    docs = renderer.manifests({"server": {"publicUrl": "https://dask.example.com"}})
    assert env_of(container(docs))["PROVISIONER_PUBLIC_URL"]["value"] == "https://dask.example.com"
    validator = jsonschema.Draft7Validator(schema)
    for bad in ("dask.example.com", "https://dask.example.com/provisioner", "ftp://x"):
        values = {**defaults, "server": {**defaults["server"], "publicUrl": bad}}
        assert list(validator.iter_errors(values)), bad


def test_existing_claim_and_no_persistence(renderer):
    docs = renderer.manifests({"persistence": {"existingClaim": "old-data"}})
    assert "PersistentVolumeClaim" not in [d["kind"] for d in docs]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "old-data"}
    docs = renderer.manifests({"persistence": {"enabled": False}})
    assert "PersistentVolumeClaim" not in [d["kind"] for d in docs]
    assert "emptyDir" in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"][0]
    assert "WARNING" in renderer.render({"persistence": {"enabled": False}})["NOTES.txt"]


@pytest.mark.parametrize(
    "values,message",
    [
        ({"backend": "mesos"}, "mesos.master"),
        ({"backend": "kubernetes"}, "backend"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"state": {"type": "postgresql"}}, "state.type postgresql"),
        ({"state": {"type": "mysql"}}, "state.type"),
        ({"metricsToken": {"existingSecret": "prov-metrics", "secretKey": ""}},
         "metricsToken.secretKey"),
        ({"state": {"type": "postgresql", "postgresql": {"existingSecret": "db"}},
          "persistence": {"enabled": False}}, "encryptionKey.existingSecret"),
        ({"encryptionKey": {"existingSecret": "prov-key", "secretKey": ""}},
         "encryptionKey.secretKey"),
    ],
)
def test_templates_refuse_what_the_schema_refuses(renderer, values, message):
    """helm --skip-schema-validation must not produce a broken Deployment either."""
    with pytest.raises(RenderError, match=re.escape(message)):
        renderer.render(values)


@pytest.mark.parametrize("name", [None, *(p.name for p in EXAMPLES)])
def test_notes_render(renderer, name):
    values = load_example(name) if name else {}
    notes = renderer.render(values)["NOTES.txt"]
    assert "/healthz" in notes and "Authorization: Bearer" in notes
    assert "{{" not in notes
    if name is None:
        assert 'tenant "default"' in notes


# --------------------------------------------------------------------------------------------
# The image the chart runs: the Dockerfile (no Docker engine here: parsed, not built)
# --------------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, per stage, continuation lines joined."""
    text = (CHART.parent.parent / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        assert stages, "the Dockerfile starts with FROM"
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def test_the_chart_runs_the_image_the_dockerfile_builds(renderer, defaults):
    import tomllib

    stages = dockerfile_stages()
    final = dict(stages[-1])  # the last of each instruction counts
    assert final["FROM"].startswith("python:3.11-slim"), "slim, the Python the package needs"
    # The server and postgres extras are installed, from what the first stage built.
    installs = " ".join(v for k, v in stages[-1] if k == "RUN")
    assert "'dask-provisioner[server,postgres]'" in installs
    assert any(k == "RUN" and "'.[server,postgres]'" in v for k, v in stages[0])
    copied = {v.split()[0] for k, v in stages[0] if k == "COPY"}
    packages = tomllib.loads((CHART.parent.parent / "pyproject.toml").read_text())
    for package in packages["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"the image lacks {package}"
    # Not root: the user the chart's pod security context names, with the data folder its own.
    user, _, group = final["USER"].partition(":")
    security = defaults["podSecurityContext"]
    assert (int(user), int(group)) == (security["runAsUser"], security["runAsGroup"]) != (0, 0)
    assert security["runAsNonRoot"] is True
    assert f"chown {user}:{group} {defaults['server']['dataDir']}" in installs
    # The chart's image name and tag are what a build for this version is tagged, and the
    # chart's command is the image's entrypoint with the port the image exposes.
    c = container(renderer.manifests())
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert c["image"] == f"dask-provisioner:{packages['project']['version']}"
    assert meta["appVersion"] == packages["project"]["version"]
    assert f"docker build -t {c['image']} ." in (CHART.parent.parent / "Dockerfile").read_text()
    assert json.loads(final["ENTRYPOINT"]) == c["command"][:1]
    assert final["EXPOSE"] == str(defaults["server"]["port"])
    assert defaults["server"]["dataDir"] in json.loads(final["CMD"])


def test_environments_reach_the_tenants_file_the_service_reads(renderer, schema, tmp_path):
    from provisioner import tenants

    example = load_example("local-sqlite.yaml")
    example["tenants"]["environments"] = [
        {"name": "ml", "prefix": "/opt/envs/ml", "tenants": ["acme"]},
        {"name": "gpu", "image": "registry/dask-gpu:1"}]
    merged = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text()))
    merged["tenants"].update(example["tenants"])
    assert validation_errors(schema, merged) == []
    secret = one(renderer.manifests(example), "Secret")
    path = tmp_path / "tenants.yaml"
    path.write_text(secret["stringData"]["tenants.yaml"])
    loaded = tenants.load_environments(path, tenants.load_tenants(path))
    assert [(e.name, e.python, e.image) for e in loaded] == [
        ("ml", "/opt/envs/ml/bin/python", None), ("gpu", None, "registry/dask-gpu:1")]
    # Neither a prefix nor an image: refused by the schema, as the service would.
    merged["tenants"]["environments"] = [{"name": "empty"}]
    assert validation_errors(schema, merged)
