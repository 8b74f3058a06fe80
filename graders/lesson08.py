"""Lesson 8's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_learning_rate(learning_rate)
      learning_rate(config, step) -> float     the warm-up + cosine rate of step `step` (from 0) of a TrainConfig
  compared with qlora_ref.train.learning_rate at every step of four schedules (within 1e-9 relative).
- check_training_step(training_step)
      training_step(run) -> float              one optimizer step of a qlora_ref.train.setup run, in place:
                                               run.step advanced, the mean loss appended to run.losses and returned
  compared with qlora_ref.train.train_step on two tiny QLoRA runs: batches, losses, learning rates, gradients at
  optimizer.step(), adapters and optimizer state, bit for bit (the logged loss within 1e-6 relative).
"""

import math

import torch

from .harness import _call, _Fail, _first_mismatch, _mismatch_line, _number, _run

__all__ = ["check_learning_rate", "check_training_step"]


# The schedule


def _schedule_cases():
    """(case, TrainConfig): lesson 8's schedule, a short one, one without warm-up, one with a one-step cosine."""
    from qlora_ref.train import TrainConfig

    return [
        ("lr 3e-3, steps 150, warmup_steps 10, min_lr_ratio 0.1 (lesson 8's run)",
         TrainConfig(lr=3e-3, steps=150, warmup_steps=10, min_lr_ratio=0.1)),
        ("lr 1e-3, steps 6, warmup_steps 2, min_lr_ratio 0.1", TrainConfig(lr=1e-3, steps=6, warmup_steps=2, min_lr_ratio=0.1)),
        ("lr 2e-4, steps 40, no warm-up, min_lr_ratio 0", TrainConfig(lr=2e-4, steps=40, warmup_steps=0, min_lr_ratio=0.0)),
        ("lr 5e-3, steps 11, warmup_steps 10, min_lr_ratio 0.25 (a cosine of one step)",
         TrainConfig(lr=5e-3, steps=11, warmup_steps=10, min_lr_ratio=0.25)),
    ]


def _schedule_variants(config):
    """(schedule(step), hint): the usual mistakes in learning_rate, each alone, to recognise a learner's."""
    from qlora_ref.train import learning_rate

    lr, warmup, steps, floor = config.lr, config.warmup_steps, config.steps, config.min_lr_ratio

    def cosine(step, start=warmup, span=steps - 1 - warmup, low=floor, mixed=True):
        progress = (step - start) / max(1, span)
        half = 0.5 * (1 + math.cos(math.pi * progress))
        return lr * (low + (1 - low) * half) if mixed else lr * (low + half)

    def warm_then(after):
        return lambda step: learning_rate(config, step) if step < warmup else after(step)

    return [
        (lambda step: lr * step / warmup if step < warmup else learning_rate(config, step),
         "the warm-up is lr · (step + 1) / warmup_steps: step 0 already trains with lr / warmup_steps, not 0 "
         "(a step at lr 0 would be wasted), and the last warm-up step reaches lr"),
        (warm_then(lambda step: cosine(step, span=steps - warmup)),
         "the cosine ends at the last step, steps - 1: progress = (step - warmup_steps) / max(1, steps - 1 - "
         "warmup_steps), so that the last step trains at lr · min_lr_ratio"),
        (warm_then(lambda step: cosine(step, low=0.0)),
         "the cosine decays to lr · min_lr_ratio, not to 0: lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress)))"),
        (warm_then(lambda step: cosine(step, start=0, span=steps - 1)),
         "the cosine starts where the warm-up ends: progress = (step - warmup_steps) / max(1, steps - 1 - "
         "warmup_steps) is 0 at step warmup_steps, so the first step after the warm-up trains at lr"),
        (warm_then(lambda step: cosine(step, mixed=False)),
         "mix the floor in: lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress))) goes from lr down to lr · m; "
         "lr · (m + 0.5 · (1 + cos(...))) starts above lr"),
        (warm_then(lambda step: lr),
         "after the warm-up the learning rate follows a cosine down to lr · min_lr_ratio at the last step"),
    ]


def check_learning_rate(learning_rate) -> bool:
    """Check a warm-up + cosine schedule `learning_rate(config, step) -> float` (lesson 8) against
    qlora_ref.train.learning_rate, at every step of four schedules:

        lr(s) = lr · (s + 1) / warmup_steps                                   for s < warmup_steps
        lr(s) = lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress)))            after, m = min_lr_ratio,
                progress = (s - warmup_steps) / max(1, steps - 1 - warmup_steps)
    Values pass within 1e-9 relative (+ 1e-12 · lr): the same formula rearranged in float64 moves the last
    bits. The line says how many were equal bit for bit, which check_training_step needs (it compares weights
    bit for bit). Prints one line; True on success.
    """
    from dataclasses import replace

    from qlora_ref.train import learning_rate as reference

    def body():
        exact = total = 0
        for case, config in _schedule_cases():
            expected, got = [], []
            for step in range(config.steps):
                try:
                    value = _call(learning_rate, replace(config), step)
                except ZeroDivisionError:
                    if config.warmup_steps == 0:
                        hint = ("with warmup_steps = 0 there is no warm-up: divide by warmup_steps only when "
                                "step < warmup_steps")
                    else:
                        hint = ("a cosine of one step: steps - 1 - warmup_steps is 0 here, so divide by "
                                "max(1, steps - 1 - warmup_steps)")
                    raise _Fail(f"learning_rate(config, {step}) divided by zero ({case})", hint)
                expected.append(reference(config, step))
                got.append(_number(value, f"learning_rate(config, {step})"))
            tolerance = [1e-9 * abs(e) + 1e-12 * config.lr for e in expected]
            wrong = [s for s, (e, g, tol) in enumerate(zip(expected, got, tolerance)) if not abs(g - e) <= tol]
            if wrong:
                step = wrong[0]
                line = (f"MISMATCH ({case}): {len(wrong)} of {config.steps} steps differ, first at step {step}: "
                        f"expected {expected[step]:.9g}, got {got[step]:.9g}")
                hint = next((hint for variant, hint in _schedule_variants(config)
                             if all(abs(variant(s) - g) <= tol for s, (g, tol) in enumerate(zip(got, tolerance)))),
                            None)
                if hint is None and step < config.warmup_steps:
                    hint = "during the warm-up (step < warmup_steps): lr · (step + 1) / warmup_steps"
                elif hint is None:
                    hint = ("after the warm-up: lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress))), progress = "
                            "(step - warmup_steps) / max(1, steps - 1 - warmup_steps), m = min_lr_ratio")
                raise _Fail(line, hint)
            exact += sum(g == e for e, g in zip(expected, got))
            total += config.steps
        line = f"equal to qlora_ref.train.learning_rate at every step of 4 schedules ({total} steps"
        if exact == total:
            return line + ", all bit for bit)"
        return (line + f"; {exact} bit for bit, the rest within 1e-9: a rearranged formula, which "
                "check_training_step will see, as it compares weights bit for bit)")

    return _run("check_learning_rate", body)


# The step

# (case, TrainConfig settings beyond _STEP_CONFIG, steps compared). The first clips at a norm below that of one
# micro-batch's gradient (about 0.55-0.7 here), so that clipping too early changes the result. warmup_steps 3: the
# rates of the first steps (lr/3, 2lr/3) differ from config.lr and from each other, so that a rate never set, or
# read a step ahead, shows at step 1.
_STEP_CASES = [
    ("grad_accum 2, dropout 0.1, clipping at 0.4", dict(max_grad_norm=0.4, dropout=0.1), 3),
    ("grad_accum 2, no dropout, no clipping (max_grad_norm 0)", dict(max_grad_norm=0.0, dropout=0.0, seed=1), 2),
]
_STEP_CONFIG = dict(n_train=64, n_eval=16, batch_size=8, grad_accum=2, steps=6, warmup_steps=3, r=4, alpha=8,
                    lr=3e-3, gradient_checkpointing=False, progress=False, samples=0, device="cpu")


class _StepRecorder:
    """What happens inside a run's training step, seen through hooks: the input ids and loss of each forward
    pass, the trainable gradients after each backward pass, and the learning rates and gradients that
    optimizer.step() is called with."""

    def __init__(self, run):
        self.params = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
        run.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        run.model.register_forward_hook(self._after_forward, with_kwargs=True)
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self._accumulated(name, p))
        run.optimizer.register_step_pre_hook(self._before_step)
        self.clear()

    def clear(self):
        self.forwards = []  # (input_ids, with labels, loss)
        self.backwards = []  # {name: gradient after that backward}
        self.steps = []  # ([lr of each group], {name: gradient or None})

    def _before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels", args[1] if len(args) > 1 else None)
        self.forwards.append([None if ids is None else ids.detach().clone(), labels is not None, None])

    def _after_forward(self, module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        self.forwards[-1][2] = None if loss is None else float(loss.detach())

    def _accumulated(self, name, p):
        if not self.backwards or name in self.backwards[-1]:  # each backward fills every trainable once
            self.backwards.append({})
        self.backwards[-1][name] = p.grad.detach().clone()

    def _before_step(self, optimizer, args, kwargs):
        grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in self.params.items()}
        self.steps.append(([group["lr"] for group in optimizer.param_groups], grads))


def _batch_index(run, ids, upto):
    """The index i < upto whose batch (batch_indices + collate) has these input ids, or None."""
    from qlora_ref.tasks import collate
    from qlora_ref.train import batch_indices

    config = run.config
    for index in range(upto):
        examples = [run.train_examples[i] for i in batch_indices(len(run.train_examples), config.batch_size,
                                                                   config.seed, index)]
        candidate = collate(examples, run.tokenizer)["input_ids"]
        if candidate.shape == ids.shape and torch.equal(candidate, ids):
            return index
    return None


def _check_batches(reference, yours, ref_rec, rec, step, case):
    k = reference.config.grad_accum
    if not rec.forwards:  # the model was not called through model(...): its hooks saw nothing to compare
        return
    if len(rec.forwards) != k:
        raise _Fail(f"MISMATCH at step {step} ({case}): the model ran {len(rec.forwards)} forward passes, expected "
                    f"grad_accum = {k}, one per micro-batch",
                    "for micro in range(config.grad_accum): one batch, one forward pass with labels, one backward")
    for micro, ((expected, _, _), (got, _, _)) in enumerate(zip(ref_rec.forwards, rec.forwards)):
        if got is not None and got.shape == expected.shape and torch.equal(got, expected):
            continue
        index = (step - 1) * k + micro
        found = None if got is None else _batch_index(yours, got, (step + 1) * k + 1)
        line = (f"MISMATCH at step {step} ({case}): micro-batch {micro + 1} of {k} should be batch index {index} "
                f"(run.step * grad_accum + micro = {step - 1} * {k} + {micro})")
        if found is None:
            hint = ("batch = collate([run.train_examples[i] for i in batch_indices(len(run.train_examples), "
                    "config.batch_size, config.seed, index)], run.tokenizer)")
        else:
            line += f", got the examples of batch index {found}"
            hint = ("each micro-batch of each step is a new slice of the data: index = run.step * "
                    "config.grad_accum + micro")
            if found == index - micro:
                hint = ("every micro-batch used the same examples: " + hint)
        raise _Fail(line, hint)


def _check_loss(reference, yours, returned, ref_rec, rec, step, case):
    k = reference.config.grad_accum
    if len(yours.losses) != step:
        raise _Fail(f"after step {step} ({case}) run.losses has {len(yours.losses)} entries, expected {step}",
                    "append the step's mean loss (a float) to run.losses, once per step")
    expected = reference.losses[-1]
    for what, value in (("run.losses[-1]", yours.losses[-1]), ("the value training_step returned", returned)):
        if isinstance(value, torch.Tensor):
            raise _Fail(f"{what} is a tensor ({case}), expected a Python float",
                        "use loss.item(): a loss tensor keeps the step's whole autograd graph (every saved "
                        "activation) alive for as long as run.losses holds it")
        if value is None:
            raise _Fail(f"{what} is None ({case}), expected the step's mean loss",
                        "return the mean loss of the micro-batches, the value appended to run.losses")
        got = _number(value, what)
        # 1e-6 relative: the mean may be taken in float32 (tensors) or float64 (Python floats, as train_step
        # does); a float32 rounding is 6e-8 relative. Everything that changes the weights is compared exactly.
        if abs(got - expected) <= 1e-6 * abs(expected):
            continue
        line = f"MISMATCH at step {step} ({case}) in {what}: expected {expected:.9g}, got {got:.9g}"
        losses = [loss for _, _, loss in ref_rec.forwards]

        def close(a, b):
            return abs(a - b) <= 1e-6 * abs(b)

        if rec.forwards and not all(with_labels for _, with_labels, _ in rec.forwards):
            hint = ("call run.model(input_ids=batch['input_ids'], labels=batch['labels']): with labels the model "
                    "computes the loss on the answer tokens only (labels -100 elsewhere)")
        elif close(got, expected / k):
            hint = ("log the unscaled loss: the mean of loss.item() over the micro-batches (loss / grad_accum is "
                    "what backward() gets, not what the step reports)")
        elif close(got, expected * k):
            hint = "the mean, not the sum: divide the sum of the micro-batches' losses by grad_accum"
        elif any(close(got, loss) for loss in losses):
            hint = "average the losses of all grad_accum micro-batches, not one of them"
        elif len(rec.forwards) == len(losses) and rec.forwards[0][2] == losses[0]:
            hint = ("the first micro-batch's loss is right, a later one's is not: nothing may change the model "
                    "between micro-batches (one optimizer.step(), after the loop), and dropout draws its masks "
                    "in the order of the forward passes")
        else:
            hint = ("the mean over the micro-batches of run.model(input_ids=..., labels=...).loss.item(), one "
                    "forward pass per micro-batch, in order (dropout draws from the random generator in that order)")
        raise _Fail(line, hint)


def _ratio(got, expected):
    """c such that got = c · expected (within 1e-5 relative), or None."""
    scale = float(expected.double().norm())
    if scale == 0.0:
        return None
    c = float(got.double().norm()) / scale
    if torch.allclose(got.double(), c * expected.double(), rtol=1e-5, atol=1e-12 * scale):
        return c
    return None


def _gradient_hint(config, ref_rec, rec, left_over, name):
    """The likeliest reason why the gradient of `name` at optimizer.step() differs from the reference's."""
    k = config.grad_accum
    ref_backwards, backwards = ref_rec.backwards, rec.backwards
    got_step = rec.steps[0][1][name]
    if left_over and backwards and any(not torch.equal(backwards[0][n], r) for n, r in ref_backwards[0].items()):
        return ("the previous step left its gradients in .grad, and backward() adds to .grad: this step's "
                "gradient includes the last one's. Zero them after optimizer.step(): "
                "run.optimizer.zero_grad(set_to_none=True)")
    if backwards and not torch.equal(backwards[0][name], ref_backwards[0][name]):
        expected = ref_backwards[0 if len(backwards) == len(ref_backwards) else -1][name]
        c = _ratio(backwards[0][name], expected)
        if c is not None and abs(c - k) < 1e-4:
            return (f"each micro-batch's gradient is grad_accum = {k} times too large: backward() on "
                    "loss / config.grad_accum, so that the micro-batches add up to the gradient of their mean loss")
        if c is not None and abs(c - 1) > 1e-4:
            return (f"the gradient is {c:.4g} times the expected: scale each micro-batch's loss by "
                    f"1 / grad_accum = 1/{k} before backward(), no more and no less")
        return "the loss of each micro-batch, divided by grad_accum, and its backward(): one per micro-batch"
    if len(backwards) == len(ref_backwards) and any(
            not torch.equal(b[n], r[n]) for b, r in zip(backwards, ref_backwards) for n in r):
        return ("the gradients changed between two micro-batches' backward passes (clipped or zeroed inside the "
                "loop?): let the micro-batches accumulate untouched, then clip once, after the last backward")
    if config.max_grad_norm == 0:
        return ("max_grad_norm = 0 means no clipping (clip_grad_norm_ with max_norm 0 would zero every gradient): "
                "clip only if config.max_grad_norm > 0")
    if not bool(got_step.any()):
        return ("the gradient is zero at optimizer.step(): zero the gradients after the step (for the next one), "
                "not between the backward passes and the step")
    if torch.equal(got_step, ref_backwards[-1][name]):
        return ("the gradient was not clipped: torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm) "
                "after the last backward, before optimizer.step()")
    return ("clip once, over all trainable parameters together: clip_grad_norm_(run.trainable, "
            "config.max_grad_norm) scales every gradient by the same factor, from their joint norm")


def _check_step_calls(ref_rec, rec, step, case):
    # Counted in the reference's unit: its optimizer.step() runs the step pre-hooks once per call.
    calls = len(rec.steps) // len(ref_rec.steps)
    if calls != 1:
        hint = ("after the last micro-batch's backward (and the clipping), call run.optimizer.step() once" if not calls
                else "call run.optimizer.step() once per training step, after all micro-batches: not inside the loop")
        raise _Fail(f"at step {step} ({case}) run.optimizer.step() was called {calls} times, expected once", hint)


def _check_optimizer_step(reference, ref_rec, rec, left_over, step, case):
    from qlora_ref.train import learning_rate

    config = reference.config
    (expected_lrs, expected_grads), (got_lrs, got_grads) = ref_rec.steps[0], rec.steps[0]
    for expected, got in zip(expected_lrs, got_lrs):
        if got == expected:
            continue
        line = (f"MISMATCH at step {step} ({case}) in the learning rate at optimizer.step(): expected "
                f"{expected!r} (learning_rate(config, {step - 1})), got {got!r}")
        if isinstance(got, (int, float)) and abs(got - expected) <= 1e-9 * expected:
            hint = ("equal up to the last bits: your learning_rate rearranges the formula, and the weights are "
                    "compared bit for bit. Write it in the order of check_learning_rate's formula: "
                    "lr * (step + 1) / warmup_steps, lr * (m + (1 - m) * 0.5 * (1 + cos(pi * progress)))")
        elif got == config.lr:
            hint = ("the learning rate was never set (the optimizer still has config.lr): before optimizer.step(), "
                    "set group['lr'] = learning_rate(config, run.step) in every param group")
        elif got == learning_rate(config, step):
            hint = ("that is the next step's rate: read the schedule at run.step before advancing it (the first "
                    "step is run.step = 0)")
        else:
            hint = "set group['lr'] = learning_rate(config, run.step) in every param group, before optimizer.step()"
        raise _Fail(line, hint)
    for name, expected in expected_grads.items():
        got = got_grads[name]
        if got is None:
            raise _Fail(f"MISMATCH at step {step} ({case}): the gradient of {name} is None at optimizer.step()",
                        "backward() on each micro-batch's loss before optimizer.step(); zero the gradients after "
                        "the step, not before it")
        found = _first_mismatch(expected, got)
        if found:
            raise _Fail(_mismatch_line(f"the gradient of {name} at optimizer.step()", f"step {step}, {case}", found,
                                       expected.numel()),
                        _gradient_hint(config, ref_rec, rec, left_over, name))


def _check_after_step(reference, yours, step, case):
    from qlora_ref.optimizer_state import optimizer_state_tensors

    if yours.step != step:
        raise _Fail(f"after step {step} ({case}) run.step is {yours.step}, expected {step}",
                    "advance run.step by one at the end of the step: the schedule and the batches read it")
    expected_params = dict(reference.model.named_parameters())
    for name, p in yours.model.named_parameters():
        if p.requires_grad:
            found = _first_mismatch(expected_params[name].detach(), p.detach())
            if found:
                raise _Fail(_mismatch_line(f"{name} after the step", f"step {step}, {case}", found, p.numel()),
                            "the learning rate and the gradients at optimizer.step() were right: change the "
                            "adapters only through run.optimizer.step(), once per step")
    expected_state, got_state = optimizer_state_tensors(reference.optimizer), optimizer_state_tensors(yours.optimizer)
    for key, expected in expected_state.items():
        got = got_state.get(key)
        if got is None or not torch.equal(got, expected):
            raise _Fail(f"MISMATCH at step {step} ({case}) in the optimizer's state {key}",
                        "use run.optimizer as it is (one step() per training step), and do not replace it")


def _grads_left(run):
    """Whether a step left nonzero gradients in .grad (zero_grad(set_to_none=True) leaves None)."""
    return any(p.grad is not None and bool(p.grad.any()) for p in run.trainable)


def check_training_step(training_step) -> bool:
    """Check one QLoRA training step `training_step(run) -> float` (lesson 8) against qlora_ref.train.train_step.

    Given a run from qlora_ref.train.setup, one step: set every param group's lr to learning_rate(config,
    run.step); for each of the grad_accum micro-batches (index run.step * grad_accum + micro, batch_indices +
    collate), a forward pass with labels and backward() on loss / grad_accum; clip the gradient norm of the
    trainable parameters to max_grad_norm (when > 0); run.optimizer.step(); zero the gradients; advance run.step;
    append the mean of the micro-batches' losses (a float) to run.losses and return it.

    Two tiny QLoRA runs on the CPU (the course's model, r 4, batches of 8, grad_accum 2; clipping at 0.4 with
    dropout for 3 steps, no clipping for 2), each set up twice from the same seed: one stepped by train_step,
    one by yours. After every step, compared in this order: the micro-batches' input ids, the number of
    optimizer.step() calls, the mean loss (within 1e-6 relative: averaged in float32 or in float64), the learning
    rate and every gradient at optimizer.step(), run.step, the adapters and the optimizer's state (all exactly).
    The gradients seen after each backward pass name the likeliest mistake. Prints one line; True on success.
    """
    from qlora_ref.train import TrainConfig, setup, train_step

    def compare(case, config, steps):
        runs, states = [], []
        for _ in range(2):  # setup seeds torch: both runs start identical, with the same random state
            runs.append(setup(config))
            states.append(torch.get_rng_state())
        (reference, yours), records = runs, [_StepRecorder(run) for run in runs]
        for step in range(1, steps + 1):
            left_over = _grads_left(yours)
            returned = None
            for i, run in enumerate(runs):  # each run draws its dropout masks from its own random state
                torch.set_rng_state(states[i])
                records[i].clear()
                if run is reference:
                    train_step(run)
                else:
                    returned = _call(training_step, run)
                states[i] = torch.get_rng_state()
            _check_batches(reference, yours, records[0], records[1], step, case)
            _check_step_calls(records[0], records[1], step, case)
            _check_loss(reference, yours, returned, records[0], records[1], step, case)
            _check_optimizer_step(reference, records[0], records[1], left_over, step, case)
            _check_after_step(reference, yours, step, case)

    def body():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is fastest, and spinning threads crawl on a busy CPU
        try:
            with torch.random.fork_rng(devices=[]):  # setup reseeds torch; the caller's random state is restored
                for case, changes, steps in _STEP_CASES:
                    compare(case, TrainConfig(**_STEP_CONFIG, **changes), steps)
        finally:
            torch.set_num_threads(threads)
        total = sum(steps for _, _, steps in _STEP_CASES)
        return (f"batches, losses, learning rates, gradients, adapters and optimizer state equal train_step's, "
                f"bit for bit ({total} steps of two runs: grad_accum 2, dropout, clipping on and off)")

    return _run("check_training_step", body)
