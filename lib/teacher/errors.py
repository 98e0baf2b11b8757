"""The teacher's two failures: an endpoint that failed or answered something unusable, and a budget cap reached."""


class BudgetExceeded(RuntimeError):
    """The teacher would spend past teacher_max_tokens / teacher_max_cost_usd."""


class TeacherError(RuntimeError):
    """The teacher endpoint failed or answered something unusable: one line naming the host, never a key or a body."""
