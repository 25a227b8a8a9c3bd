"""The database floor: typed settings, the schema, sessions and migrations."""

from db.settings import Destination, Settings, SettingsError, load_settings

__all__ = ["Destination", "Settings", "SettingsError", "load_settings"]
