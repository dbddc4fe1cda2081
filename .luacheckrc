std = "luajit"
max_line_length = 120
read_globals = { "ngx" }
files["spec"] = { std = "+busted" }
files["spec/support"] = { globals = { "ngx" } }
files["examples"] = { globals = { "ngx" } }
exclude_files = { "build", "build-asan", "spec/tmp", "node_modules" }
