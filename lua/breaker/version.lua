-- The one source of the module's version: the Makefile feeds it to the C
-- modules as BREAKER_VERSION, the rockspec repeats it in its defines, and
-- spec/version_spec.lua checks that all of them agree.
return "0.1.0"
