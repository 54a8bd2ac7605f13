"""User errors: one line that names the key, the bad value and what would be valid."""


class ConfigError(ValueError):
    """A knob has a value we cannot run with. `str()` is the whole message users see."""

    def __init__(self, key: str, value: object, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")

    def __reduce__(self):  # crosses process boundaries (Ray ranks) intact
        return ConfigError, (self.key, self.value, self.expected)


class UserError(RuntimeError):
    """Any other mistake a user can make (missing model folder, bad prompt file): one line, exit 2."""
