"""Op family: aggregate (see fastmetamer.ops)."""
