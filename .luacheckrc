std = "luajit"
max_line_length = 120
-- `not (x >= 0)` is written on purpose: unlike `x < 0` it also catches NaN.
ignore = { "581" }
read_globals = { "ngx" }
files["spec"] = { std = "+busted" }
files["spec/support"] = { globals = { "ngx" } }
files["examples"] = { globals = { "ngx" } }
exclude_files = { "build", "build-asan", "spec/tmp", "node_modules" }
-- plain output: CI logs and tools read it
color = false
