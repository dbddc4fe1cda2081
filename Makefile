# breaker - circuit breakers, retries and a libcurl transport for Lua/OpenResty.
# Every variable can be overridden: make CC=clang LUA_INCDIR=/usr/include/lua5.1
LUAJIT      ?= luajit
LUA51       ?= lua5.1
BUSTED      ?= /usr/bin/busted
LUACHECK    ?= luacheck
LUAROCKS    ?= luarocks
LUA_INCDIR  ?= /usr/include/luajit-2.1
CURL_CFLAGS ?= $(shell curl-config --cflags 2>/dev/null)
CURL_LIBS   ?= -lcurl
VERSION     := $(shell sed -n 's/^return "\(.*\)"/\1/p' lua/breaker/version.lua)

OPT      ?= -O2
WARN     ?= -std=c99 -Wall -Wextra -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
            -Wpointer-arith -Wcast-qual -Wwrite-strings -Werror
CFLAGS   ?= $(OPT) -g
ALL_CFLAGS = $(CFLAGS) $(WARN) -fPIC -D_GNU_SOURCE -DBREAKER_VERSION='"$(VERSION)"' \
             -I$(LUA_INCDIR) $(CURL_CFLAGS)
LDFLAGS  ?=
SANFLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow \
           -fno-sanitize-recover=undefined,float-cast-overflow

BUILD   ?= build
PREFIX  ?= /usr/local
DESTDIR ?=
LUA_LIBDIR ?= $(PREFIX)/lib/lua/5.1
LUA_SHAREDIR ?= $(PREFIX)/share/lua/5.1

CORE_SRC = src/breaker.c src/shm.c src/lbreaker.c
CORE_HDR = src/breaker.h src/shm.h src/compat.h
CURL_SRC = src/http.c src/lhttp.c
CURL_HDR = src/http.h src/compat.h

TEST_ENV = LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;' LUA_CPATH='$(BUILD)/?.so;;'

.PHONY: all build deps test lint specs asan valgrind bench demo demo-core install clean

all: build

build: $(BUILD)/breaker/core.so $(BUILD)/breaker/curl.so

$(BUILD)/breaker/core.so: $(CORE_SRC) $(CORE_HDR) lua/breaker/version.lua
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -shared -o $@ $(CORE_SRC) $(LDFLAGS) -lpthread -lm -lrt -ldl

$(BUILD)/breaker/curl.so: $(CURL_SRC) $(CURL_HDR) lua/breaker/version.lua
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -shared -o $@ $(CURL_SRC) $(LDFLAGS) $(CURL_LIBS) -lpthread -lm

# Installs the Debian packages that are missing; silent when all are present.
deps:
	@sh tools/deps.sh

lint: build
	$(LUACHECK) -q lua spec bench examples tools

specs: build
	$(TEST_ENV) tools/run-specs.sh $(LUAJIT) $(LUA51) $(BUSTED)

test: deps lint specs

# The specs against an AddressSanitizer + UndefinedBehaviorSanitizer build of
# the C modules. LuaJIT itself is not instrumented, so the runtime is preloaded.
asan: deps
	$(MAKE) BUILD=build-asan CFLAGS='$(SANFLAGS)' LDFLAGS='-fsanitize=address,undefined,float-cast-overflow' build
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	LUA_PATH='lua/?.lua;lua/?/init.lua;spec/?.lua;;' LUA_CPATH='build-asan/?.so;;' \
	tools/run-specs.sh $(LUAJIT) $(LUA51) $(BUSTED)

# The C core and the libcurl transport (against the fake upstream) under
# valgrind's memcheck: no definite leaks, no errors.
valgrind: deps build
	$(TEST_ENV) valgrind -q --leak-check=full --errors-for-leak-kinds=definite \
	    --error-exitcode=9 $(LUAJIT) tools/valgrind-core.lua
	$(TEST_ENV) valgrind -q --leak-check=full --errors-for-leak-kinds=definite \
	    --error-exitcode=9 $(LUAJIT) tools/valgrind-curl.lua

bench: deps build
	$(TEST_ENV) $(LUAJIT) bench/run.lua

# The main job: replays an LLM-provider incident against the fake upstream,
# once without and once with breaker.llm's default policy.
demo: deps build
	$(TEST_ENV) $(LUAJIT) examples/demo.lua

# A breaker tripping, rejecting, probing and closing, each transition printed.
demo-core: build
	$(TEST_ENV) $(LUAJIT) examples/trip.lua

install: build
	$(LUAROCKS) make --deps-mode=none breaker-scm-1.rockspec \
	    LUA_INCDIR=$(LUA_INCDIR) CURL_INCDIR=/usr/include/x86_64-linux-gnu

clean:
	rm -rf build build-asan spec/tmp luacov.*
