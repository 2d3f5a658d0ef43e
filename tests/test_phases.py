"""The phase machine: the transition table, its enforcement, observers and the diagram."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from typedbrain import TRANSITIONS, Phase, PhaseMachine, PhaseTransitionError
from typedbrain._phases import RESTING_PHASES, STAGE_PHASES, Stage, mermaid_diagram

ROOT = Path(__file__).resolve().parent.parent
ACTIVE_PHASES = frozenset(Phase) - RESTING_PHASES


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[Phase, Phase]] = []

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        self.changes.append((old, new))


def test_table_has_an_entry_for_every_phase_and_only_phases_as_targets() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for source, targets in TRANSITIONS.items():
        assert isinstance(targets, frozenset), source
        assert targets, f"{source} is a dead end"
        assert targets <= set(Phase)


def test_every_phase_is_reachable_from_init() -> None:
    seen = {Phase.INIT}
    queue = deque([Phase.INIT])
    while queue:
        for target in TRANSITIONS[queue.popleft()]:
            if target not in seen:
                seen.add(target)
                queue.append(target)
    assert seen == set(Phase)


def test_entry_points_start_from_resting_phases_only() -> None:
    starts = {Phase.FIT_START, Phase.TEST}
    for phase in Phase:
        if phase in RESTING_PHASES:
            assert starts <= TRANSITIONS[phase], phase
        else:
            # Not being able to start fit/evaluate from an active phase is what makes a call
            # from inside a hook a transition error.
            assert not starts & TRANSITIONS[phase], phase


def test_every_active_phase_can_fail_and_resting_phases_cannot() -> None:
    for phase in ACTIVE_PHASES:
        assert Phase.FAILED in TRANSITIONS[phase], phase
    for phase in RESTING_PHASES:
        assert Phase.FAILED not in TRANSITIONS[phase], phase


def test_checkpoint_returns_only_to_the_stages_that_save_checkpoints() -> None:
    assert TRANSITIONS[Phase.CHECKPOINT] == {Phase.TRAIN, Phase.VALID, Phase.FAILED}
    for stage_phase in (Phase.TRAIN, Phase.VALID):
        assert Phase.CHECKPOINT in TRANSITIONS[stage_phase]


def test_each_stage_has_its_own_phase() -> None:
    assert {stage: STAGE_PHASES[stage] for stage in Stage} == {
        Stage.TRAIN: Phase.TRAIN,
        Stage.VALID: Phase.VALID,
        Stage.TEST: Phase.TEST,
    }


def test_refused_move_names_current_attempted_and_allowed_phases() -> None:
    machine = PhaseMachine()
    with pytest.raises(PhaseTransitionError) as caught:
        machine.move(Phase.VALID)
    error = caught.value
    assert (error.current, error.attempted, error.allowed) == (
        Phase.INIT,
        Phase.VALID,
        TRANSITIONS[Phase.INIT],
    )
    assert str(error) == (
        "cannot move from phase INIT to VALID; allowed from INIT: FIT_START, TEST"
    )
    assert machine.phase is Phase.INIT


def test_observers_follow_changes_in_order_until_unsubscribed() -> None:
    machine = PhaseMachine()
    first, second = Recorder(), Recorder()
    machine.subscribe(first)
    machine.subscribe(second)
    machine.move(Phase.TEST)
    machine.unsubscribe(first)
    machine.move(Phase.IDLE)
    assert first.changes == [(Phase.INIT, Phase.TEST)]
    assert second.changes == [(Phase.INIT, Phase.TEST), (Phase.TEST, Phase.IDLE)]
    with pytest.raises(ValueError, match=r"remove"):
        machine.unsubscribe(first)


class Raising:
    def __init__(self, message: str) -> None:
        self.message = message

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        raise RuntimeError(self.message)


def test_every_observer_hears_of_a_change_though_an_earlier_one_raised() -> None:
    machine = PhaseMachine()
    after = Recorder()
    machine.subscribe(Raising("first"))
    machine.subscribe(Raising("second"))
    machine.subscribe(after)
    with pytest.raises(RuntimeError, match="first") as caught:
        machine.move(Phase.TEST)
    assert after.changes == [(Phase.INIT, Phase.TEST)]
    assert machine.phase is Phase.TEST
    assert len(caught.value.__notes__) == 1
    assert "raised too: RuntimeError: second" in caught.value.__notes__[0]


def test_phase_module_does_not_import_torch() -> None:
    for name in ("_phases.py", "_errors.py"):
        tree = ast.parse((ROOT / "typedbrain" / name).read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert "torch" not in imported, name


def test_docs_diagram_is_generated_from_the_table() -> None:
    page = (ROOT / "docs" / "phases.md").read_text()
    assert f"```mermaid\n{mermaid_diagram()}```" in page


def test_diagram_has_one_edge_per_allowed_transition() -> None:
    lines = mermaid_diagram().splitlines()
    edges = {tuple(line.strip().split(" --> ")) for line in lines[2:]}
    expected = {(a.name, b.name) for a, targets in TRANSITIONS.items() for b in targets}
    assert edges == expected
    assert len(lines) - 2 == len(expected)


class PhaseMachineAgainstTable(RuleBasedStateMachine):
    """Random sequences of attempted moves, each checked against the table."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = PhaseMachine()
        self.recorder = Recorder()
        self.machine.subscribe(self.recorder)
        self.expected_phase = Phase.INIT
        self.expected_changes: list[tuple[Phase, Phase]] = []

    @rule(attempted=st.sampled_from(Phase))
    def attempt(self, attempted: Phase) -> None:
        target = attempted
        source = self.expected_phase
        if target in TRANSITIONS[source]:
            assert self.machine.can_move(target)
            self.machine.move(target)
            self.expected_phase = target
            self.expected_changes.append((source, target))
        else:
            assert not self.machine.can_move(target)
            with pytest.raises(PhaseTransitionError) as caught:
                self.machine.move(target)
            assert caught.value.current is source
            assert caught.value.attempted is target
            assert caught.value.allowed == TRANSITIONS[source]

    @invariant()
    def machine_matches_model(self) -> None:
        assert self.machine.phase is self.expected_phase
        assert self.machine.allowed == TRANSITIONS[self.expected_phase]
        assert self.recorder.changes == self.expected_changes


TestPhaseMachineAgainstTable = PhaseMachineAgainstTable.TestCase
