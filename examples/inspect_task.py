"""An Inspect task whose samples run in mvm sandboxes, offline:

    pip install -e '.[inspect]'
    inspect eval examples/inspect_task.py --sandbox mvm --model mockllm/model

The solver has the sandbox compute each sample's answer
with Python; the scorer reads the answer file back out of the sandbox.
"""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Scorer, Target, accuracy, scorer
from inspect_ai.solver import Generate, Solver, TaskState, solver
from inspect_ai.util import sandbox


@solver
def compute_in_sandbox() -> Solver:
    async def solve(state: TaskState, generate: Generate) -> TaskState:
        expression = state.metadata["expression"]
        await sandbox().write_file("work/expression.txt", expression)
        result = await sandbox().exec(
            ["python", "-c", "print(eval(open('expression.txt').read()))"], cwd="work", timeout=60
        )
        await sandbox().write_file("work/answer.txt", result.stdout.strip())
        return state

    return solve


@scorer(metrics=[accuracy()])
def answer_file_matches() -> Scorer:
    async def score(state: TaskState, target: Target) -> Score:
        answer = (await sandbox().read_file("work/answer.txt")).strip()
        return Score(value=CORRECT if answer == target.text else INCORRECT, answer=answer)

    return score


@task
def sandbox_arithmetic() -> Task:
    return Task(
        dataset=[
            Sample(input="What is 6 * 7?", target="42", metadata={"expression": "6 * 7"}),
            Sample(input="What is 2 ** 10?", target="1024", metadata={"expression": "2 ** 10"}),
        ],
        solver=compute_in_sandbox(),
        scorer=answer_file_matches(),
    )
