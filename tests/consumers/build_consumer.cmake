# tests/consumers/build_consumer.cmake - configure, build and run one consumer project, as a user
# would, in a fresh binary directory. Run by ctest as `cmake -D...=... -P build_consumer.cmake`.
#
# Inputs (-D):
#   CONSUMER_SOURCE_DIR, CONSUMER_BINARY_DIR   the consumer project and where to build it
#   GENERATOR, MAKE_PROGRAM, CXX_COMPILER, BUILD_TYPE   the toolchain of the build running the test
#   ATTN_SOURCE_DIR     passed on to the consumer (add_subdirectory)
#   ATTN_PREFIX         passed on as CMAKE_PREFIX_PATH (find_package)
#   ATTN_ARCHIVE_FROM   an attn source tree to pack into a release-style .tar.gz first; the
#                       consumer gets ATTN_ARCHIVE (its path) and ATTN_ARCHIVE_SHA256 (FetchContent)
#   FORBIDDEN           "|"-separated strings that must not occur in any compile command of the
#                       consumer: the flags attn uses for its own targets, which it must never impose
#   CONFIGURE_ONLY      ON: stop after a successful configure (a project that only checks CMake logic)
#   CXX_FLAGS           the consumer's CMAKE_CXX_FLAGS (e.g. -Werror on a project that sets its own warnings)
#   EXECUTABLE          the program to run (default: consumer)
#   EXPECT_NO_INSTALL   ON: `cmake --install` of the consumer must install nothing of attn's
cmake_minimum_required(VERSION 3.16)

foreach(var CONSUMER_SOURCE_DIR CONSUMER_BINARY_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "build_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

# A consumer gets exactly the flags its own CMakeLists.txt asks for: nothing from the environment
# of the build that runs this test (whose CXXFLAGS could carry -march=native, say).
unset(ENV{CXXFLAGS})
unset(ENV{LDFLAGS})
unset(ENV{CPPFLAGS})

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc COMMAND_ECHO STDOUT)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer ${CONSUMER_SOURCE_DIR}: ${what} failed (${rc})")
  endif()
endfunction()

file(REMOVE_RECURSE "${CONSUMER_BINARY_DIR}")
file(MAKE_DIRECTORY "${CONSUMER_BINARY_DIR}")

set(args -S "${CONSUMER_SOURCE_DIR}" -B "${CONSUMER_BINARY_DIR}" -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
    --no-warn-unused-cli)
if(MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(ATTN_SOURCE_DIR)
  list(APPEND args "-DATTN_SOURCE_DIR=${ATTN_SOURCE_DIR}")
endif()
if(ATTN_PREFIX)
  list(APPEND args "-DCMAKE_PREFIX_PATH=${ATTN_PREFIX}")
endif()
if(CXX_FLAGS)
  list(APPEND args "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}")
endif()
if(NOT EXECUTABLE)
  set(EXECUTABLE consumer)
endif()

if(ATTN_ARCHIVE_FROM)
  # What a release archive of attn holds: the library and its CMake files, in one top directory.
  # No tests/, bench/ or examples/: a subproject must not need them.
  set(stage "${CONSUMER_BINARY_DIR}/archive")
  file(MAKE_DIRECTORY "${stage}/attn-src")
  file(COPY "${ATTN_ARCHIVE_FROM}/CMakeLists.txt" "${ATTN_ARCHIVE_FROM}/LICENSE" "${ATTN_ARCHIVE_FROM}/cmake"
       "${ATTN_ARCHIVE_FROM}/include" DESTINATION "${stage}/attn-src")
  run_step("packing attn" "${CMAKE_COMMAND}" -E chdir "${stage}" "${CMAKE_COMMAND}" -E tar czf attn-src.tar.gz attn-src)
  file(SHA256 "${stage}/attn-src.tar.gz" sha256)
  list(APPEND args "-DATTN_ARCHIVE=${stage}/attn-src.tar.gz" "-DATTN_ARCHIVE_SHA256=${sha256}")
endif()

run_step(configure "${CMAKE_COMMAND}" ${args})
if(CONFIGURE_ONLY)
  return()
endif()

# The consumer's compile lines (written at generate time) hold its own flags and none of ours.
if(FORBIDDEN)
  set(commands_file "${CONSUMER_BINARY_DIR}/compile_commands.json")
  if(NOT EXISTS "${commands_file}")
    message(FATAL_ERROR "${commands_file} is missing: generator ${GENERATOR} cannot show the consumer's flags")
  endif()
  file(READ "${commands_file}" commands)
  string(REPLACE "|" ";" forbidden "${FORBIDDEN}")
  list(REMOVE_ITEM forbidden "")
  foreach(flag IN LISTS forbidden)
    string(FIND "${commands}" "${flag}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "the consumer's compile commands contain `${flag}`, which attn must not give its users:\n${commands}")
    endif()
  endforeach()
endif()

run_step(build "${CMAKE_COMMAND}" --build "${CONSUMER_BINARY_DIR}" --config "${BUILD_TYPE}")

if(EXPECT_NO_INSTALL)
  set(install_dir "${CONSUMER_BINARY_DIR}/install-check")
  run_step(install "${CMAKE_COMMAND}" --install "${CONSUMER_BINARY_DIR}" --prefix "${install_dir}" --config "${BUILD_TYPE}")
  file(GLOB_RECURSE installed "${install_dir}/*")
  if(installed)
    list(JOIN installed "\n  " installed)
    message(FATAL_ERROR "attn as a subproject installed files into its user's package:\n  ${installed}")
  endif()
endif()

# Single-config generators put the program in the binary directory, multi-config ones in <config>/.
set(exe "${CONSUMER_BINARY_DIR}/${EXECUTABLE}")
if(NOT EXISTS "${exe}")
  set(exe "${CONSUMER_BINARY_DIR}/${BUILD_TYPE}/${EXECUTABLE}")
endif()
run_step(run "${exe}")
