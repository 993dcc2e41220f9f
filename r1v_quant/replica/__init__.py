"""The built-in tiny Skywork-R1V replica: real config keys, tensor names and templates, trained to a
verified skill."""
