"""The README: its two Quickstart commands are the ones CI runs, and its Python examples run."""

import pathlib
import re
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)


def test_quickstart_has_exactly_two_one_line_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    main_job, tests = commands
    assert main_job.endswith("python -m experiments")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _quickstart_commands()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def _python_blocks():
    """The README's Python examples, each keyed by its first line that is not an import."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n```", readme, flags=re.DOTALL)
    return {_first_statement(block): block for block in blocks}


def _first_statement(code):
    return next(
        line for line in code.splitlines() if line and not line.startswith(("import ", "from "))
    )


def _run(example, *, replace=("", ""), part=None, **names):
    """Runs the README example keyed ``example`` in a namespace of ``names``, with ``replace``'s
    first text replaced by its second; ``part="before"`` or ``"after"`` runs only the code before
    or after its ``# Later, in a fresh process`` comment. ``names`` are a user's own data, never
    modules: a reader who copies an example gets its imports with it."""
    blocks = _python_blocks()
    assert example in blocks, sorted(blocks)
    modules = [name for name, value in names.items() if isinstance(value, types.ModuleType)]
    assert not modules, modules
    before, marker, after = blocks[example].partition("# Later, in a fresh process")
    code = {None: blocks[example], "before": before, "after": marker + after}[part]
    exec(compile(code.replace(*replace), "README.md", "exec"), names)
    return names


def test_every_python_example_of_the_readme_is_run_here():
    assert sorted(_python_blocks()) == sorted(
        [
            "tx = optax.chain(",
            "optimizer = nnx.Optimizer(model, emm.ema_sgd(learning_rate=0.1, beta=0.9), "
            "wrt=nnx.Param)",
            "state = train_state.TrainState.create(",
            "with ocp.StandardCheckpointer() as checkpointer:  # path: an absolute pathlib.Path",
            "jax.distributed.initialize()  # multi-host only: once per process, before any "
            "other JAX call",
            "tx = emm.ema_sgd(lr, beta=0.999, accumulator_dtype=jnp.bfloat16, "
            'rounding="stochastic", seed=0)',
        ]
    )


def _params():
    import jax.numpy as jnp

    return {"w": jnp.ones((8, 2)), "b": jnp.zeros(8)}


def test_readme_optax_chain():
    import jax
    import jax.numpy as jnp

    params = _params()
    ns = _run("tx = optax.chain(", params=params, grads=jax.tree.map(jnp.ones_like, params))
    assert ns["state"][2][0].count == 1  # the chain's third element is ema_sgd
    assert all(bool(jnp.all(ns["params"][k] < params[k])) for k in params)


def _losses(step, n=3):
    return [float(step()) for _ in range(n)]


def test_readme_flax_nnx():
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    ns = _run(next(k for k in _python_blocks() if k.startswith("optimizer = nnx")), model=model)
    x, y = jnp.ones((8, 4)), jnp.zeros((8, 1))
    losses = _losses(lambda: ns["train_step"](model, ns["optimizer"], x, y))
    assert losses[2] < losses[0]


def test_readme_flax_linen():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    x, y = jnp.ones((8, 4)), jnp.zeros((8, 1))
    ns = _run(
        "state = train_state.TrainState.create(", model=nn.Dense(1), key=jax.random.key(0), x=x
    )
    state, losses = ns["state"], []
    for _ in range(3):
        state, loss = ns["train_step"](state, x, y)
        losses.append(float(loss))
    assert losses[2] < losses[0] and int(state.step) == 3


def test_readme_orbax_checkpoint(tmp_path):
    import jax
    import jax.numpy as jnp
    import optax

    import ema_momentum as emm

    tx = emm.ema_sgd(0.1, beta=0.9, debias=True)
    params = _params()
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    key = next(k for k in _python_blocks() if k.startswith("with ocp.StandardCheckpointer()"))
    _run(key, part="before", path=tmp_path, params=params, opt_state=opt_state)
    # The restoring part runs as in a fresh process: only the path and the user's own
    # init_params are carried over, no import and no name from the saving part.
    ns = _run(key, part="after", path=tmp_path, init_params=_params)
    saved = {"params": params, "opt_state": opt_state}
    assert jax.tree.structure(ns["restored"]) == jax.tree.structure(saved)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ns["restored"], saved)
    )
    assert optax.tree.get(ns["restored"]["opt_state"], "weight_sum") > 0


def test_readme_scaling_out_keeps_the_velocity_sharded_like_the_params():
    import jax
    import jax.numpy as jnp

    import ema_momentum as emm

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] - y) ** 2) + jnp.sum(p["b"] ** 2)

    key = next(k for k in _python_blocks() if k.startswith("jax.distributed.initialize()"))
    ns = _run(
        key,
        replace=("jax.distributed.initialize()", "pass"),  # one host here
        tx=emm.ema_sgd(0.1, 0.9), loss=loss, params=_params(),
        x=jnp.ones((16, 8)), y=jnp.zeros((16, 2)),
    )  # fmt: skip
    params, opt_state = ns["step"](ns["params"], ns["opt_state"], ns["x"], ns["y"])
    velocity = opt_state[0].velocity
    for name in params:
        assert velocity[name].sharding == params[name].sharding == ns["params"][name].sharding
    assert len(params["w"].sharding.device_set) == jax.device_count()


def test_readme_bfloat16_state():
    import jax.numpy as jnp

    first = next(k for k in _python_blocks() if k.startswith("tx = emm.ema_sgd(lr"))
    ns = _run(first, lr=0.1)
    assert ns["tx"].init({"w": jnp.ones(3)})[0].velocity["w"].dtype == jnp.bfloat16


def _lower_bounds():
    """``{name: (major, minor, patch)}`` of each ``name>=version`` requirement of pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["experiments"]]
    bounds = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        if match:
            bounds[match[1]] = _version(match[2])
    return bounds


def _version(text):
    return tuple(int(n) for n in [*text.split("."), "0", "0"][:3])


def test_readme_versions_are_the_pyproject_lower_bounds():
    """The Versions paragraph names the lower bounds the project declares, flax's included: the
    suite is run at those bounds with one flax, so the extra must not allow an older one."""
    readme = (ROOT / "README.md").read_text()
    versions = readme.split("\nVersions:", 1)[1].split("\n\n", 1)[0]
    bounds = _lower_bounds()
    library = re.search(r"`jax >= ([0-9.]+)` and `optax >= ([0-9.]+)`", versions)
    assert (_version(library[1]), _version(library[2])) == (bounds["jax"], bounds["optax"])
    flax = re.search(r"at those\s+lower bounds \(with flax ([0-9.]+)\)", versions)
    assert _version(flax[1]) == bounds["flax"]


def test_readme_large_seed_advice_makes_a_hyperparameter_that_maps():
    """A seed >= 2**31 passed through inject_hyperparams as the README says stays a hyperparameter:
    mapped over an ensemble, each member draws its own bits, the first those of its plain seed."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import ema_momentum as emm

    readme = (ROOT / "README.md").read_text()
    advice = re.search(r"pass a seed of 2\*\*31 or\s+more as `([^`]+)`", readme)[1]
    seeds = [2**32 - 5, 2**31]
    options = dict(accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    factory = optax.inject_hyperparams(emm.ema_momentum, static_args=tuple(options))
    grad = jnp.full((64,), 0.3, jnp.float32)
    states = []
    for seed in seeds:
        injected = eval(advice, {"jnp": jnp, "np": np, "seed": seed})
        states.append(factory(0.75, seed=injected, **options).init(grad))
        assert int(states[-1].hyperparams["seed"]) == seed
    tx = factory(0.75, seed=jnp.uint32(0), **options)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    grads = jnp.stack([grad, grad])
    for _ in range(3):
        _, stacked = jax.jit(jax.vmap(tx.update))(grads, stacked)
    velocity = np.asarray(optax.tree.get(stacked, "velocity"), np.float32)
    assert not np.array_equal(velocity[0], velocity[1])
    plain = emm.ema_momentum(0.75, seed=seeds[0], **options)
    state = plain.init(grad)
    for _ in range(3):
        _, state = jax.jit(plain.update)(grad, state)
    np.testing.assert_array_equal(velocity[0], np.asarray(state.velocity, np.float32))


def test_readme_verdicts_are_those_of_the_exported_report():
    """The README's results table states, claim by claim, the verdicts stored in docs/results."""
    import json

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d)\. [^|]*\| \*\*([^*]+)\*\* \|", section, flags=re.MULTILINE)
    stored = json.loads((ROOT / "docs" / "results" / "verdicts.json").read_text())
    assert rows == [(v["claim"].split(".", 1)[0], v["verdict"]) for v in stored]


def _readme_sentence(pattern, what):
    """The match of ``pattern`` in the README's text with its line breaks and runs of spaces made
    single spaces; fails naming ``what`` if the sentence changed."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(pattern, readme)
    assert found, f"the README's sentence on {what} changed"
    return found


def test_readme_integer_option_bounds_are_the_clis():
    """The Results paragraph's bounds on integer options are those the command line enforces."""
    from experiments import cli, nqm, quadratic

    bounds = _readme_sentence(
        r"\(`nqm`'s batch sizes below 2\*\*(\d+)[^;]*; `quadratic --steps` is at most "
        r"([0-9,]+); `--seeds` at most ([0-9,]+)\)",
        "integer options",
    )
    assert 2 ** int(bounds[1]) == nqm.MAX_BATCH_SIZE
    assert int(bounds[2].replace(",", "")) == quadratic.MAX_STEPS
    assert int(bounds[3].replace(",", "")) == cli.MAX_SEEDS


def test_readme_bfloat16_state_bytes():
    """The bfloat16 section's byte counts for 20M float32 params, with and without x64 (shapes
    only: jax.eval_shape allocates nothing)."""
    import jax
    import jax.numpy as jnp

    import ema_momentum as emm

    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:  # older jax
        from jax.experimental import enable_x64
    claim = _readme_sentence(
        r"for (\d+)M float32 params the state takes ([0-9,]+) bytes in float32 and ([0-9,]+) "
        r"bytes in bf16 \(the (\d+) extra bytes .*?; (\d+) under x64",
        "the bf16 state's bytes",
    )
    params = jax.ShapeDtypeStruct((int(claim[1]) * 10**6,), jnp.float32)

    def state_bytes(accumulator_dtype):
        tx = emm.ema_sgd(0.1, beta=0.999, accumulator_dtype=accumulator_dtype)
        state = jax.eval_shape(tx.init, params)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))

    full, half, extra, extra_x64 = (int(claim[i].replace(",", "")) for i in (2, 3, 4, 5))
    assert (state_bytes(None), state_bytes(jnp.bfloat16)) == (full, half)
    assert full - params.size * 4 == half - params.size * 2 == extra
    with enable_x64(True):
        assert state_bytes(jnp.bfloat16) - params.size * 2 == extra_x64


def test_readme_optax_ema_debias_under_a_schedule():
    """The API section's numbers for optax.ema's debiasing under a beta schedule."""
    import jax.numpy as jnp
    import optax

    claim = _readme_sentence(
        r"`(optax\.inject_hyperparams\(optax\.ema\)\([^`]+\))` with a constant gradient 1 it "
        r"returns ([0-9.]+), ([0-9.]+), …, ([0-9.]+) over (\w+) steps",
        "optax.ema under a schedule",
    )
    tx = eval(claim[1], {"optax": optax})
    steps = {"six": 6}[claim[5]]
    state, outputs = tx.init(jnp.zeros(())), []
    for _ in range(steps):
        update, state = tx.update(jnp.ones(()), state)
        outputs.append(float(update))
    shown = [claim[2], claim[3], claim[4]]
    got = [outputs[0], outputs[1], outputs[-1]]
    assert [round(g, len(s.split(".")[1])) for g, s in zip(got, shown, strict=True)] == [
        float(s) for s in shown
    ]


def test_readme_baselines_table_is_that_of_the_stored_results():
    """The README's baselines table: the linear and MLP rows are those of the exported report
    (docs/results/report.md), the CNN row those of docs/results/baselines_cnn.json."""
    import json

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Baselines", 1)[1].split("\n## ", 1)[0]
    rows = {
        m[0]: m[1:]
        for m in re.findall(
            r"^\| (logistic regression|MLP|CNN)[^|]*\| [\d.]+% \| ([\d.]+)(?: ± ([\d.]+))?% "
            r"\| ([\d.]+)(?: ± ([\d.]+))?% \(lr ([\d.]+)\) \|$",
            section,
            flags=re.MULTILINE,
        )
    }
    assert sorted(rows) == ["CNN", "MLP", "logistic regression"], rows
    report = (ROOT / "docs" / "results" / "report.md").read_text()
    stored = dict(
        (m[0], m[1:])
        for m in re.findall(
            r"^\| (linear|mlp) \| [\d.]+ \| ([\d.]+) "
            r"\| ([\d.]+) \(beta 0\.9, lr ([\d.]+)\) \| 1 \|$",
            report,
            flags=re.MULTILINE,
        )
    )
    pct = lambda fraction: f"{100 * float(fraction):.1f}"
    for name, model in (("logistic regression", "linear"), ("MLP", "mlp")):
        adam, adam_std, ema, ema_std, lr = rows[name]
        assert (adam, adam_std, ema, ema_std) == (
            pct(stored[model][0]),
            "",
            pct(stored[model][1]),
            "",
        )
        assert float(lr) == float(stored[model][2])
    cnn = json.loads((ROOT / "docs" / "results" / "baselines_cnn.json").read_text())["cnn"]
    assert rows["CNN"] == (
        pct(cnn["test_accuracy"]),
        pct(cnn["test_accuracy_std"]),
        pct(cnn["ema_sgd"]["test_accuracy"]),
        pct(cnn["ema_sgd"]["test_accuracy_std"]),
        f"{cnn['ema_sgd']['lr']:g}",
    )
    assert f"CNN ({cnn['seeds']} seeds)" in section


def test_readme_bfloat16_step_temporary_bytes():
    """The bfloat16 section's temporary bytes of a jitted, donated step (compiled, not run)."""
    import jax
    import jax.numpy as jnp
    import optax

    import ema_momentum as emm

    readme = " ".join((ROOT / "README.md").read_text().split())
    claim = re.search(
        r"`memory_analysis\(\)` for (\d+)M params reports ([0-9,]+) temporary bytes with a bf16 "
        r"velocity \((\d+) more with stochastic rounding\) and none with float32 or "
        r"`optax.sgd\(momentum\)`",
        readme,
    )
    assert claim, "the README's sentence on the bf16 step's temporary bytes changed"
    # The sentence is about XLA's CPU backend: compiled for a CPU device also on a GPU host.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    params = jax.ShapeDtypeStruct((int(claim[1]) * 10**6,), jnp.float32, sharding=cpu)

    def temp_bytes(tx):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = jax.eval_shape(tx.init, params)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), state)
        jitted = jax.jit(step, donate_argnums=(0, 1))
        return jitted.lower(params, state, params).compile().memory_analysis().temp_size_in_bytes

    bf16, extra = int(claim[2].replace(",", "")), int(claim[3])
    assert bf16 == params.size * 2  # a whole copy of the bf16 velocity
    assert temp_bytes(emm.ema_sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16)) == bf16
    stochastic = emm.ema_sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    assert temp_bytes(stochastic) == bf16 + extra
    assert temp_bytes(emm.ema_sgd(0.1, 0.9)) == 0
    assert temp_bytes(optax.sgd(0.01, momentum=0.9)) == 0


def test_readme_step_speed_ranges_hold_the_table_they_summarize():
    """The Performance-of-the-step summary: each quoted range holds this table's ema_sgd value
    (at the range's precision), and the overall bandwidth range holds both per-shape ranges."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Performance of the step", 1)[1].split("\n## ", 1)[0]
    table = {
        (m[0], m[1]): (m[2], m[3])
        for m in re.findall(
            r"^\| (1 x 20M|500 x 20k) \| (emm\.ema_sgd) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| "
            r"([\d.]+) \|",
            section,
            flags=re.MULTILINE,
        )
    }
    one, many = table["1 x 20M", "emm.ema_sgd"], table["500 x 20k", "emm.ema_sgd"]
    claim = _readme_sentence(
        r"([\d.]+)\u2013([\d.]+) of its time for one 20M leaf and ([\d.]+)\u2013([\d.]+) for 500 "
        r"leaves.*?at ([\d.]+)\u2013([\d.]+) of the bandwidth of `x \+ y` \(([\d.]+)\u2013([\d.]+) "
        r"for one 20M leaf, ([\d.]+)\u2013([\d.]+) for 500 leaves",
        "the step's speed against optax.sgd and x + y",
    )

    def holds(low, high, value):
        digits = len(high.split(".")[1])
        return float(low) <= round(float(value), digits) <= float(high)

    assert holds(claim[1], claim[2], one[0]) and holds(claim[3], claim[4], many[0])
    assert holds(claim[7], claim[8], one[1]) and holds(claim[9], claim[10], many[1])
    for low, high in ((claim[7], claim[8]), (claim[9], claim[10])):
        assert float(claim[5]) <= float(low) <= float(high) <= float(claim[6]), (low, high)


def _synopsis():
    """``{command: text}`` of the README's command list ('' for the main job)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Experiments: `python -m experiments`", 1)[1]
    block = re.search(r"```\n(.*?)\n```", section, flags=re.DOTALL)[1]
    commands, command = {}, None
    for line in block.splitlines():
        line = line.split("  #", 1)[0]
        if line.startswith("python -m experiments"):
            rest = line.removeprefix("python -m experiments").split()
            command = rest[0] if rest and not rest[0].startswith(("[", "-")) else ""
            commands[command] = line
        else:
            commands[command] += " " + line.strip()
    return commands


def test_readme_command_list_is_that_of_the_parsers():
    """Each command of the README's list exists, with the options it shows (their choices, and
    required only where shown outside brackets), and no command is missing from the list."""
    from experiments import cli

    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    synopsis = _synopsis()
    assert sorted(synopsis) == sorted(["", *subparsers.choices])
    for command, text in synopsis.items():
        sub = subparsers.choices[command] if command else parser
        options = {o: a for a in sub._actions for o in a.option_strings}
        depth, shown, last = 0, {}, None
        for token in re.findall(r"\[|\]|[^\s\[\]]+", text):
            depth += {"[": 1, "]": -1}.get(token, 0)
            if token.startswith("--"):
                shown[token] = depth
                last = token
            elif "|" in token and options[last].choices is not None:
                # --lrs auto|0.01,0.1 is an example, not a list of choices.
                assert sorted(token.split("|")) == sorted(options[last].choices), (command, last)
        for option, depth in shown.items():
            assert option in options, (command, option)
            assert options[option].required == (depth == 0), (command, option)


def test_readme_api_signatures_are_the_codes():
    """The API section's signatures: ema_momentum's parameters and defaults as the code has them,
    ema_sgd's as its learning_rate and beta followed by the same keyword options, and
    EmaMomentumState's fields in order."""
    import inspect

    import ema_momentum as emm

    def shown(sig):
        return [
            f"{p.name}={p.default!r}".replace("'", '"') if p.default is not p.empty else p.name
            for p in sig.parameters.values()
        ]

    readme = " ".join((ROOT / "README.md").read_text().split())
    section = readme.split("## API", 1)[1].split("## ", 1)[0]
    momentum = re.search(r"\*\*`emm\.ema_momentum\(([^`]*)\)`\*\*", section)[1]
    want = shown(inspect.signature(emm.ema_momentum))
    keyword_only = [p.kind for p in inspect.signature(emm.ema_momentum).parameters.values()]
    want.insert(keyword_only.index(inspect.Parameter.KEYWORD_ONLY), "*")
    assert [part.strip() for part in momentum.split(",")] == want
    sgd = re.search(r"\*\*`emm\.ema_sgd\(([^`]*)\)`\*\*", section)[1]
    sgd_params = inspect.signature(emm.ema_sgd).parameters
    assert [part.strip() for part in sgd.split(",")] == [
        *shown(inspect.signature(emm.ema_sgd))[:2],
        "**same",
    ]
    assert list(sgd_params)[2:] == list(inspect.signature(emm.ema_momentum).parameters)[1:]
    assert all(
        sgd_params[name].default == p.default
        for name, p in inspect.signature(emm.ema_momentum).parameters.items()
    )
    state = re.search(r"\*\*`emm\.EmaMomentumState\(([^`]*)\)`\*\*", section)[1]
    assert [part.strip() for part in state.split(",")] == list(emm.EmaMomentumState._fields)


def test_readme_nqm_numbers_are_those_of_the_exported_report():
    """The Results section's noisy-quadratic-model numbers, from the NQM table of
    docs/results/report.md: momentum within the stated percentage of SGD's steps up to the stated
    batch size, the stated factor fewer at the largest, and the tuned beta at the grid's top (the
    stated beta) exactly over the stated range of batch sizes."""
    claim = _readme_sentence(
        r"in the noisy quadratic model: within (\d+)% of SGD's steps at B <= (\d+), (\d+)x fewer "
        r"at B = (\d+), with beta up to ([0-9.]+), the largest of the tuning grid; the tuned beta "
        r"sat at that edge at B = (\d+) to (\d+)",
        "the NQM's numbers",
    )
    report = (ROOT / "docs" / "results" / "report.md").read_text()
    section = report.split("## 6. The noisy quadratic model", 1)[1].split("\n## ", 1)[0]
    rows = [
        (int(m[0]), int(m[1]), int(m[2]), float(m[3]))
        for m in re.findall(
            r"^\| (\d+) \| (\d+) \| (\d+) \| [^|]+ \| [^|]+ \| ([0-9.]+) \|", section, re.MULTILINE
        )
    ]
    assert rows, "the report's NQM table changed"
    within, small, fewer, large = (int(claim[i]) for i in (1, 2, 3, 4))
    top, first, last = float(claim[5]), int(claim[6]), int(claim[7])
    for batch, sgd, momentum, _ in rows:
        if batch <= small:
            assert abs(momentum / sgd - 1) <= within / 100, batch
    sgd, momentum = next((s, m) for b, s, m, _ in rows if b == large)
    # A whole factor: the ratio rounded down.
    assert fewer <= sgd / momentum < fewer + 1 and large == max(b for b, *_ in rows)
    assert max(beta for *_, beta in rows) <= top
    assert [b for b, _, _, beta in rows if beta == top] == [
        b for b, *_ in rows if first <= b <= last
    ]
