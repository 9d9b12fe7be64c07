"""Named test plugins: ``freeze`` (module) and ``precise`` (a precision-role Plugin subclass)."""
