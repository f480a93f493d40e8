"""The task store: per-task guide rows and Adam moments off the device, the same fit bit for bit."""

import json
import os

import pytest
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, TaskStore, fit, load_tokenizer
from bora_pyro.errors import CheckpointError, WriteError
from bora_pyro.fit import BatchStream
import bora_pyro.task_store as task_store_module
from bora_pyro.row_arrays import FileRows
from bora_pyro.task_store import StoredRows
from bora_pyro.guides import hybrid_guide, map_guide, mean_field_guide, only_tasks
from bora_pyro.models import BoRA, HierarchicalNormal
from bora_pyro.run import (
    CONFIG_FILE, GUIDE_FILE, METRICS_FILE, TASK_STORE_FOLDER, TASKS_FOLDER, load_checkpoint, save_checkpoint,
)
from conftest import fit_synthetic_run, synthetic_records

NUM_TASKS = 5


@pytest.fixture(scope="module")
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=NUM_TASKS, docs_per_task=16)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                           test_size=0.2, validation_size=0.2)


def fitted(gpt2_dir, corpus, make_guide, task_store=None, **settings):
    """A fit of 36 steps with validation every 6 (patience 2), so that the best check's rows are
    restored at the end and tasks come back to steps with moments to continue from."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = make_guide(model, task_store=task_store)
    result = fit(model, guide, corpus, steps=36, batch_size=3, lr=0.4, eval_every=6, patience=2, progress=False,
                 seed=1, **settings)
    return guide, result


def guide_values(guide) -> dict[str, torch.Tensor]:
    """Every site's median, and for a Normal part its σ: [D, ...] for task sites."""
    parts = list(guide) if isinstance(guide, torch.nn.ModuleList) else [guide]
    values = {}
    for number, part in enumerate(parts):
        values |= {f"{number}.{name}": value for name, value in part.median().items()}
        if hasattr(part, "_get_loc_and_scale"):
            values |= {f"{number}.{name}.scale": part._get_loc_and_scale(name)[1]
                       for name, _ in part.prototype_trace.iter_stochastic_nodes()}
    return values


@pytest.mark.parametrize("make_guide, settings, restores_best", [
    (map_guide, {}, True),
    (map_guide, {"weight_decay": 0.1, "optimizer": "adamw"}, False),
    (mean_field_guide, {}, True),
    (hybrid_guide, {"log_scale_lr": None}, True),
])
@pytest.mark.parametrize("on_disk", [False, True])
def test_a_fit_with_the_store_ends_bit_for_bit_where_one_without_it_does(gpt2_dir, corpus, tmp_path, make_guide,
                                                                         settings, restores_best, on_disk):
    """MAP, AdamW with decay, mean-field and hybrid (one optimizer group), in host memory and on
    disk; ``restores_best``: validation stopped the fit past its best check, whose rows come back."""
    reference, reference_result = fitted(gpt2_dir, corpus, make_guide, **settings)
    store = TaskStore(tmp_path / "store" if on_disk else None)
    stored, stored_result = fitted(gpt2_dir, corpus, make_guide, store, **settings)
    assert stored_result.history == reference_result.history
    assert stored_result.best_step == reference_result.best_step
    assert (stored_result.best_step < stored_result.steps) == restores_best
    expected, got = guide_values(reference), guide_values(stored)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert store.sites and all(rows.steps.max() > 1 for rows in store.sites.values())
    expected_state, stored_state = reference.state_dict(), stored.state_dict()  # rows named as TaskRows' leaves
    assert expected_state.keys() == stored_state.keys()
    assert all(torch.equal(stored_state[key], expected_state[key]) for key in expected_state)
    if on_disk:
        files = list((tmp_path / "store").iterdir())
        assert files and all(path.suffix == ".f32" for path in files)


def test_a_state_dict_moves_between_guides_with_and_without_a_store(gpt2_dir, corpus):
    reference, _ = fitted(gpt2_dir, corpus, mean_field_guide)
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    stored, plain = mean_field_guide(model, task_store=TaskStore()), mean_field_guide(model)
    with torch.no_grad():
        for guide in (stored, plain):
            guide(corpus.train.collate([0], corpus.pad_token_id))
    stored.load_state_dict(reference.state_dict())
    plain.load_state_dict(stored.state_dict())
    expected = guide_values(reference)
    for guide in (stored, plain):
        got = guide_values(guide)
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    with pytest.raises(RuntimeError, match="Missing key.*rows.4"):
        stored.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.endswith("rows.4")})


def test_the_guide_on_the_device_does_not_grow_with_the_tasks(gpt2_dir, corpus):
    """With a store, the guide's own parameters (what sits on the device between steps) are the
    shared sites only: the same for 3 and 300 tasks."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    sizes = {}
    for num_tasks in (3, 300):
        model = BoRA(lm, HierarchicalNormal(30.0), num_tasks)
        guide = mean_field_guide(model, task_store=TaskStore())
        with torch.no_grad():
            guide(corpus.train.collate([0], corpus.pad_token_id))
        sizes[num_tasks] = sum(p.numel() for p in guide.parameters())
        assert {rows.values.shape[0] for rows in guide.task_store.sites.values()} == {num_tasks}
    assert sizes[3] == sizes[300] > 0


class Interrupted(Exception):
    pass


def fit_with_checkpoints(gpt2_dir, corpus, run_dir, make_guide, task_store, interrupt_at=None, resume=None):
    """``fitted``'s fit with a checkpoint at every check (every 6 steps), saved into ``run_dir``;
    returns the guide and, per checkpoint, the task shards it wrote."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = make_guide(model, task_store=task_store)
    written = {}

    def checkpoint(state):
        save_checkpoint(run_dir, state)
        written[state.step] = sorted(path.name for path in (run_dir / TASKS_FOLDER).glob(f"*.{state.step}.safetensors"))
        if state.step == interrupt_at:
            raise Interrupted

    fit(model, guide, corpus, steps=36, batch_size=3, lr=0.4, eval_every=6, patience=2, progress=False, seed=1,
        on_checkpoint=checkpoint, resume=resume)
    return guide, written


@pytest.mark.parametrize("make_guide, interrupt_at", [(map_guide, 24), (mean_field_guide, 12)])
def test_a_resume_from_the_incremental_checkpoint_is_bit_exact(gpt2_dir, corpus, tmp_path, make_guide, interrupt_at):
    """Each checkpoint writes the shards of only the tasks stepped or snapshotted since the last
    one, removes the shards it replaced, and a fit resumed from one ends where the uninterrupted
    fit does. ``interrupt_at``: a check without a new best, whose shards are the stepped tasks'."""
    uninterrupted, written = fit_with_checkpoints(gpt2_dir, corpus, tmp_path / "a", make_guide, TaskStore())
    assert all(len(names) <= NUM_TASKS for names in written.values()) and any(written.values())
    before_first_snapshot = written[6]
    assert len(before_first_snapshot) == NUM_TASKS  # the first snapshot marks every task
    names = sorted(path.name for path in (tmp_path / "a" / TASKS_FOLDER).iterdir())
    assert len(names) == NUM_TASKS  # one current shard per task, the replaced ones removed
    with pytest.raises(Interrupted):
        fit_with_checkpoints(gpt2_dir, corpus, tmp_path / "b", make_guide, TaskStore(tmp_path / "store-b"),
                             interrupt_at=interrupt_at)
    state = load_checkpoint(tmp_path / "b")
    assert state.step == interrupt_at and state.best_step < interrupt_at and state.task_shards is not None
    torch.manual_seed(12345)  # whatever happened since must not matter
    resumed, _ = fit_with_checkpoints(gpt2_dir, corpus, tmp_path / "b", make_guide, TaskStore(tmp_path / "store-c"),
                                      resume=state)
    expected, got = guide_values(uninterrupted), guide_values(resumed)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_checkpoint_resumes_only_with_a_guide_like_the_one_that_wrote_it(gpt2_dir, corpus, tmp_path):
    with pytest.raises(Interrupted):
        fit_with_checkpoints(gpt2_dir, corpus, tmp_path, map_guide, TaskStore(), interrupt_at=6)
    with pytest.raises(CheckpointError, match="written by a fit with a task store"):
        fit_with_checkpoints(gpt2_dir, corpus, tmp_path, map_guide, None, resume=load_checkpoint(tmp_path))


def test_the_cli_fits_with_a_store_on_disk_as_without_one(gpt2_dir, tmp_path):
    """``fit --task-store disk``: the same guide.safetensors (every task, no store needed to load
    it) and test metrics as the fit without a store; its checkpoint's tasks are shards; its
    working files are gone once the run is saved."""
    from safetensors.torch import load_file

    flags = ("--guide", "mean-field", "--eval-every", "4")
    plain = fit_synthetic_run(tmp_path / "plain", gpt2_dir, *flags)
    stored = fit_synthetic_run(tmp_path / "stored", gpt2_dir, *flags, "--task-store", "disk")
    expected, got = load_file(plain / GUIDE_FILE), load_file(stored / GUIDE_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
    assert (json.loads((stored / METRICS_FILE).read_text())["test"]
            == json.loads((plain / METRICS_FILE).read_text())["test"])
    assert json.loads((stored / CONFIG_FILE).read_text())["task_store"] == "disk"
    assert list((stored / TASKS_FOLDER).iterdir())  # the checkpoint's shards
    assert not (stored / TASK_STORE_FOLDER / "rank0").exists()  # the working files, removed once the run is saved


def test_evaluate_export_and_diagnose_load_a_run_into_a_store_and_report_as_without_it(gpt2_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    """``--task-store disk`` for evaluate, ``export --all-tasks`` and diagnose: the run's rows are
    loaded into a store a row at a time and read a pass at a time (2 tasks here); the outputs
    are those of the run loaded whole, and the store's files are gone after."""
    from safetensors.torch import load_file

    from bora_pyro.cli import main

    monkeypatch.setattr(task_store_module, "TASKS_PER_PASS", 2)
    run = fit_synthetic_run(tmp_path / "run", gpt2_dir, "--guide", "mean-field", "--eval-every", "4", num_tasks=5)
    capsys.readouterr()
    reads, select = [], StoredRows.select
    monkeypatch.setattr(StoredRows, "select", lambda rows, tasks=None: reads.append(tasks) or select(rows, tasks))
    outputs = []
    for store in ([], ["--task-store", "disk"]):
        out = tmp_path / f"adapters{len(store)}"
        outputs.append([])
        for command in (["evaluate", str(run)], ["diagnose", str(run)],
                        ["export", str(run), "--all-tasks", "--out", str(out)],
                        ["predict", str(run), "--samples", "8", "--no-calibration"]):
            assert main([*command, *store]) == 0
            outputs[-1].append(json.loads(capsys.readouterr().out))
        outputs[-1].append({path.relative_to(out).as_posix(): load_file(path) for path in out.rglob("*.safetensors")})
    (evaluated, diagnosed, _, predicted, adapters), (evaluated_stored, diagnosed_stored, _, predicted_stored,
                                                      adapters_stored) = outputs
    assert predicted_stored["tasks"].keys() == predicted["tasks"].keys() and predicted_stored["samples"] == 8
    for name, task in predicted["tasks"].items():  # other draws: the same plug-in, a mean within the interval
        got = predicted_stored["tasks"][name]
        assert got["plugin"] == pytest.approx(task["plugin"], rel=1e-6) and got["tokens"] == task["tokens"]
        assert task["ci"][0] <= got["mean"] <= task["ci"][1], name
    assert evaluated_stored == evaluated
    assert diagnosed_stored["sites"].keys() == diagnosed["sites"].keys()
    for group, summary in diagnosed["sites"].items():
        assert diagnosed_stored["sites"][group] == pytest.approx(summary, rel=1e-6), group
    assert adapters_stored.keys() == adapters.keys() and len(adapters) == 5 + 1
    for name, tensors in adapters.items():
        assert all(torch.equal(adapters_stored[name][key], tensors[key]) for key in tensors), name
    assert main(["export", str(run), "--task", "task1", "--out", str(tmp_path / "task1")]) == 0
    one = load_file(tmp_path / "task1" / "adapter_model.safetensors")
    index = json.loads((tmp_path / "adapters2" / "index.json").read_text())  # each task's folder holds its own adapter
    assert all(torch.equal(adapters_stored[f"{index['tasks']['task1']}/adapter_model.safetensors"][key], one[key])
               for key in one)
    assert main(["predict", str(run), "--task-store", "disk"]) != 0  # calibration draws every task at once
    assert "--no-calibration" in capsys.readouterr().err
    assert not list(run.glob(f"{TASK_STORE_FOLDER}-*"))
    assert reads and all(tasks is not None and len(tasks) <= 2 for tasks in reads)  # only the store's reads


def test_predictive_draws_of_a_store_pass_by_pass_share_each_draw_s_global_factors(gpt2_dir, corpus, tmp_path,
                                                                                   monkeypatch):
    """``posterior_perplexities`` of a store-held guide draws 2 tasks' rows at a time, reading
    each row once for its S draws and median; draw s of every pass takes the shared sites of the
    first pass's draw s: one joint draw of all tasks."""
    from bora_pyro.predictive import posterior_perplexities
    from bora_pyro.task_store import guide_task_store

    monkeypatch.setattr(task_store_module, "TASKS_PER_PASS", 2)
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = mean_field_guide(model, task_store=TaskStore(tmp_path))
    with torch.no_grad():
        guide(corpus.train.collate([0], corpus.pad_token_id))
    reads, get = {}, FileRows.get
    monkeypatch.setattr(FileRows, "get", lambda rows, task, device: (
        reads.__setitem__((rows.path, task), reads.get((rows.path, task), 0) + 1), get(rows, task, device))[1])
    calls, task_factors = [], model.task_factors
    monkeypatch.setattr(model, "task_factors", lambda values, tasks=None: (
        calls.append((tasks, {name: values[name].clone() for name in model.shared_site_names})),
        task_factors(values, tasks))[1])
    report = posterior_perplexities(model, guide, corpus.documents("test"), corpus.task_names, corpus.pad_token_id,
                                    num_samples=3)
    assert report["samples"] == 3 and len(report["tasks"]) == NUM_TASKS
    draws = [call for call in calls if call[0] is not None]
    passes = [draws[k:k + 4] for k in range(0, len(draws), 4)]  # 3 draws and the plug-in per pass
    assert [len(tasks) for tasks, _ in draws[::4]] == [2, 2, 1]
    assert model.shared_site_names and all(
        all(torch.equal(part[s][1][name], passes[0][s][1][name]) for name in model.shared_site_names)
        for part in passes for s in range(3))
    assert not all(torch.equal(passes[0][0][1][name], passes[0][1][1][name]) for name in model.shared_site_names)
    assert len(reads) == NUM_TASKS * len(guide_task_store(guide).sites) and set(reads.values()) == {1}  # read once


def test_a_step_moves_the_batch_tasks_rows_and_moments_only(gpt2_dir, corpus):
    """``bytes_moved`` per step: the batch's rows to the device, their moments once they have
    some, and rows and moments back; nothing of the other tasks, and nothing to the device for
    a task that the last step wrote back (the next step takes its tensors)."""
    from bora_pyro.fit import SVIStep, make_optimizer, optimizer_groups

    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    store = TaskStore()
    guide = map_guide(model, task_store=store)
    with torch.no_grad():
        guide(corpus.train.collate([0], corpus.pad_token_id))
    optimizer = make_optimizer("adam", optimizer_groups(guide, 0.01, None, 0.0), 0.01)
    step = SVIStep(model, guide, optimizer, task_store=store)
    task_ids = corpus.train.task_ids
    row_bytes = sum(4 * torch.Size(rows.values.shape[1:]).numel() for rows in store.sites.values())
    moved = []
    for tasks in ([1, 3], [1, 3], [0, 3]):
        store.fetch(tasks)
        step(corpus.train.collate([task_ids.index(task) for task in tasks], corpus.pad_token_id))
        moved.append(store.bytes_moved - sum(moved))
    # rows to the device (+ moments once stepped), then rows and moments back
    assert moved == [2 * row_bytes * (1 + 3), 2 * row_bytes * 3, row_bytes * 1 + 2 * row_bytes * 3]
    assert [int(store.sites[key].steps.count_nonzero()) for key in store.sites] == [3] * len(store.sites)


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_file_rows_read_back_what_was_written_and_start_sparse(tmp_path, monkeypatch, direct):
    if not direct:  # as on tmpfs, which refuses O_DIRECT
        open_file = os.open
        monkeypatch.setattr(os, "open", lambda path, flags, *args: open_file(path, flags, *args)
                            if not flags & getattr(os, "O_DIRECT", 0) else (_ for _ in ()).throw(OSError(22, "")))
    rows = FileRows(tmp_path / "rows.f32", (1000, 64, 3))
    assert direct or not rows.direct  # (tmpfs before Linux 6.6 refuses O_DIRECT: the direct case falls back there)
    assert (tmp_path / "rows.f32").stat().st_size == 1000 * 4096  # 768-byte rows a 4096-byte block apart
    assert os.stat(tmp_path / "rows.f32").st_blocks * 512 < 64 * 3 * 4 * 10  # zeros not written cost no disk
    values = torch.randn(3, 64, 3)
    rows[999], rows[0], rows[1] = values
    assert torch.equal(rows[999], values[0]) and torch.equal(rows[998], torch.zeros(64, 3))
    assert torch.equal(rows[0], values[1]) and torch.equal(rows[1], values[2])  # neighbours do not overlap
    with pytest.raises(IndexError):
        rows[1000]
    with pytest.raises(ValueError, match="not"):
        rows[0] = torch.zeros(3, 64)
    rows.close()


def test_a_failed_write_of_file_rows_raises_at_the_next_write_or_when_settled(tmp_path):
    rows = FileRows(tmp_path / "rows.f32", (5, 2, 3))
    os.close(rows.fd)  # what a failing disk does to a write, as the error the user sees
    rows[0] = torch.ones(2, 3)  # written on an IO thread: the error comes later
    with pytest.raises(WriteError, match=r"cannot write the task store's file .*rows.f32 .*free disk space"):
        rows.settle()
    with pytest.raises(WriteError, match=r"cannot read the task store's file"):
        rows[0]
    rows.fd = None


def test_file_rows_read_ahead_and_a_read_always_sees_the_last_write(tmp_path, monkeypatch):
    """A row read ahead is taken without reading again; a write makes a copy read ahead before it
    stale; a read (ahead or not) waits for the row's write in flight, however slow."""
    import time

    rows = FileRows(tmp_path / "rows.f32", (5, 2, 3))
    rows[3] = torch.full((2, 3), 3.0)
    rows.will_need(3)
    rows.reads[3].result()
    reads, pread, pwrite = [], os.preadv, os.pwritev
    monkeypatch.setattr(os, "preadv", lambda *args: (reads.append(args[2]), pread(*args))[1])
    assert torch.equal(rows[3], torch.full((2, 3), 3.0)) and reads == []

    rows.will_need(3)
    rows.reads[3].result()
    rows[3] = torch.full((2, 3), 4.0)
    assert torch.equal(rows[3], torch.full((2, 3), 4.0))

    monkeypatch.setattr(os, "pwritev", lambda *args: (time.sleep(0.3), pwrite(*args))[1])
    rows[2] = torch.full((2, 3), 2.0)
    rows.will_need(2)
    assert torch.equal(rows[2], torch.full((2, 3), 2.0))
    rows[1] = torch.full((2, 3), 1.0)
    assert torch.equal(rows[1], torch.full((2, 3), 1.0))
    rows.close()


def test_file_rows_write_a_row_they_read_from_its_own_memory_and_wait_for_it(tmp_path, monkeypatch):
    """``put`` of a row the array read writes it without a copy (the caller then waits for the
    write before changing the row); any other tensor is copied."""
    import time

    from bora_pyro import row_arrays

    rows = FileRows(tmp_path / "rows.f32", (5, 2, 3))
    rows[2] = torch.full((2, 3), 2.0)
    row = rows[2]
    blocks, allocate, pwrite = [], row_arrays.aligned_empty, os.pwritev
    monkeypatch.setattr(row_arrays, "aligned_empty", lambda nbytes: (blocks.append(nbytes), allocate(nbytes))[1])
    monkeypatch.setattr(os, "pwritev", lambda *args: (time.sleep(0.3), pwrite(*args))[1])
    rows.put(4, row)
    assert blocks == []
    rows.wait_written(4)
    row.add_(1.0)  # what the next step does to a row it takes back
    rows.put(0, torch.full((2, 3), 5.0))
    assert blocks == [4096]
    assert torch.equal(rows[4], torch.full((2, 3), 2.0)) and torch.equal(rows[0], torch.full((2, 3), 5.0))
    rows.close()


def test_a_checkpoint_writes_the_shards_of_the_tasks_stepped_since_the_last_one(gpt2_dir, tmp_path, monkeypatch):
    """20 tasks, a checkpoint every 2 steps of 3 documents: a checkpoint without a new best writes
    the shards of exactly the tasks of its 2 steps; one with a new best at least those."""
    records = synthetic_records(num_tasks=5, docs_per_task=20)  # each task's documents dealt to 4 tasks
    corpus = MultiTaskCorpus([(f"{r['speaker']}-{i % 4}", r["line"]) for i, r in enumerate(records)],
                             load_tokenizer(gpt2_dir), test_size=0.0, validation_size=0.2)
    fetched = []
    fetch = TaskStore.fetch
    monkeypatch.setattr(TaskStore, "fetch", lambda store, tasks: (fetched.append(set(tasks)), fetch(store, tasks))[1])
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = map_guide(model, task_store=TaskStore())
    written, best = {}, {}

    def checkpoint(state):
        save_checkpoint(tmp_path, state)
        written[state.step] = {int(path.name.split(".")[0])
                               for path in (tmp_path / TASKS_FOLDER).glob(f"*.{state.step}.safetensors")}
        best[state.step] = state.best_step == state.step

    fit(model, guide, corpus, steps=20, batch_size=3, lr=0.4, eval_every=2, patience=None, progress=False, seed=1,
        on_checkpoint=checkpoint)
    assert not all(best.values()) and len(written) == 10
    for step, tasks in written.items():
        stepped = set().union(*fetched[step - 2:step])
        assert tasks == stepped if not best[step] else tasks >= stepped, step
    assert max(len(tasks) for step, tasks in written.items() if not best[step]) < 20


def test_a_fit_prepares_every_step_s_rows_but_the_first_s_during_the_step_before(gpt2_dir, corpus, tmp_path):
    """Before each step the fit names the next step's tasks (:meth:`TaskStore.prefetch`); that
    step takes the tasks the step before wrote back from it: only the first step reads rows cold."""
    store = TaskStore(tmp_path)
    _, result = fitted(gpt2_dir, corpus, mean_field_guide, store)
    first_batch = next(BatchStream(corpus, 3, seed=1)).task_ids.unique()
    assert result.steps > 12
    assert store.traffic.cold_reads == len(store.sites) * len(first_batch)  # values only: no moments yet


def test_a_second_fit_of_a_stored_guide_starts_its_optimizer_afresh_like_an_in_memory_one(gpt2_dir, corpus):
    finals = []
    for task_store in (None, TaskStore()):
        lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
        model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
        guide = map_guide(model, task_store=task_store)
        for seed in (1, 2):
            fit(model, guide, corpus, steps=8, batch_size=3, lr=0.1, eval_every=4, progress=False, seed=seed)
        finals.append(guide.state_dict())
    assert all(torch.equal(finals[1][key], finals[0][key]) for key in finals[0])


def test_reading_the_prior_s_sites_draws_one_task_not_all(gpt2_dir):
    """``latent_sites`` (which ``map_guide``, ``shared_site_names`` and the diagnostics run) traces
    the prior on one task: on all of them it drew [D, P] values, twice the whole store at D = 1000."""
    from bora_pyro.models.priors import latent_sites

    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), 100_000)
    sites = latent_sites(model.prior, lm.modules_spec, model.tasks_plate())
    task_sites = {name: site for name, site in sites.items() if name.startswith("task.")}
    assert task_sites and all(site["value"].shape[0] == 1 for site in task_sites.values())
    assert all(frame.full_size == 100_000 for site in task_sites.values() for frame in site["cond_indep_stack"])


def test_a_store_given_to_a_prior_without_task_sites_holds_nothing_and_fits(gpt2_dir, corpus, tmp_path):
    """τ = ∞ (one adapter for all) has no per-task sites: its store stays empty and the fit runs
    as without one (a τ sweep passes every fit a store)."""
    from bora_pyro.models import prior_from_tau

    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, prior_from_tau(float("inf")), corpus.num_tasks)
    store = TaskStore(tmp_path)
    result = fit(model, map_guide(model, task_store=store), corpus, steps=6, batch_size=3, lr=0.1, eval_every=3,
                 progress=False)
    assert result.steps == 6 and not store.sites and store.bytes_moved == 0


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide, hybrid_guide])
def test_evaluation_reads_the_store_a_few_tasks_at_a_time_and_gives_the_same_report(gpt2_dir, corpus, tmp_path,
                                                                                     make_guide, monkeypatch):
    """With a store, ``evaluate`` takes ``TASKS_PER_PASS`` tasks' medians at a time (here 2 of 5),
    and reports what the in-memory guide with the same values reports."""
    from bora_pyro import evaluate
    from bora_pyro.evaluate import evaluate_factors
    from bora_pyro.task_store import guide_task_store

    monkeypatch.setattr(task_store_module, "TASKS_PER_PASS", 2)
    reference, _ = fitted(gpt2_dir, corpus, make_guide)
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    stored = make_guide(model, task_store=TaskStore(tmp_path))
    with torch.no_grad():
        stored(corpus.train.collate([0], corpus.pad_token_id))
    stored.load_state_dict(reference.state_dict())
    read = []
    for rows in guide_task_store(stored).sites.values():
        monkeypatch.setattr(rows, "select", lambda tasks=None, select=rows.select: read.append(tasks) or select(tasks))
    report = evaluate(model, stored, corpus, "test")
    expected = evaluate_factors(lm, model.task_factors(reference.median()), corpus, "test")
    assert report["tasks"].keys() == expected["tasks"].keys() and len(report["tasks"]) == NUM_TASKS
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    for name, task in expected["tasks"].items():
        assert report["tasks"][name]["tokens"] == task["tokens"]
        assert report["tasks"][name]["perplexity"] == pytest.approx(task["perplexity"], rel=1e-5), name
    assert read and all(tasks is not None and len(tasks) <= 2 for tasks in read)
    if make_guide is map_guide:  # its median, read without running the guide, is AutoDelta's
        from pyro.infer.autoguide import AutoDelta

        expected_median, got_median = AutoDelta.median(reference), reference.median()
        assert expected_median.keys() == got_median.keys()
        assert all(torch.equal(got_median[name], expected_median[name]) for name in expected_median)


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide, hybrid_guide])
def test_diagnose_reads_the_store_a_few_tasks_at_a_time_and_gives_the_same_report(gpt2_dir, corpus, tmp_path,
                                                                                  make_guide, monkeypatch):
    """With a store, a fit keeps no copy of its start scales (the store's rows start where it
    started them) and ``diagnose`` reads ``TASKS_PER_PASS`` tasks at a time (here 2 of 5); its
    report is the in-memory fit's."""
    from bora_pyro.diagnostics import diagnose
    from bora_pyro.task_store import guide_task_store

    monkeypatch.setattr(task_store_module, "TASKS_PER_PASS", 2)
    reports = []
    for task_store in (None, TaskStore(tmp_path)):
        lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
        model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
        guide = make_guide(model, task_store=task_store)
        result = fit(model, guide, corpus, steps=36, batch_size=3, lr=0.4, eval_every=6, patience=2,
                     progress=False, seed=1)
        read = []
        if task_store is not None:
            assert all(value is None for name, value in result.start_log_scales.items() if name.startswith("task."))
            for rows in guide_task_store(guide).sites.values():
                monkeypatch.setattr(rows, "select", lambda tasks=None, select=rows.select: read.append(tasks) or select(tasks))
        reports.append(diagnose(model, guide, result.elbos, result.start_log_scales, result.elbo_window))
        assert task_store is None or (read and all(tasks is not None and len(tasks) <= 2 for tasks in read))
    expected, got = reports
    assert got["elbo"] == expected["elbo"] and got["sites"].keys() == expected["sites"].keys()
    for group, summary in expected["sites"].items():
        assert got["sites"][group] == {key: value if value is None else pytest.approx(value, rel=1e-6)
                                       for key, value in summary.items()}, group
    if make_guide is mean_field_guide:  # scales that moved, some not: the start is the store's
        assert 0 < expected["sites"]["task"]["scales_moved"] < 1


def test_the_factors_of_some_tasks_come_from_a_plate_on_the_model_s_device(gpt2_dir, corpus):
    """``task_factors(values, tasks)`` runs the prior in a plate of those tasks, on the LM's
    device: priors build their tensors on ``plate.device``; so does ``latent_sites``, on one task."""
    from bora_pyro.models.priors import latent_sites

    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = map_guide(model)
    with torch.no_grad():
        guide(corpus.train.collate([0], corpus.pad_token_id))
    plates, prior = [], model.prior
    model.prior = lambda modules, tasks: plates.append(tasks) or prior(modules, tasks)
    with only_tasks(guide, [1, 3]):
        some = model.task_factors(guide.median(), [1, 3])
    every = model.task_factors(guide.median())
    latent_sites(model.prior, lm.modules_spec, model.tasks_plate())
    assert [(plate.device, plate.subsample_size) for plate in plates] == [
        (lm.device, 2), (lm.device, NUM_TASKS), (lm.device, 1)]
    for name, (lora_A, lora_B) in some.items():
        assert torch.equal(lora_A, every[name][0][[1, 3]]) and torch.equal(lora_B, every[name][1][[1, 3]])
