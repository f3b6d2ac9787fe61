# tests/extern_templates_check.cmake - the ctest checks of ATTN_EXTERN_TEMPLATES (see
# tests/extern_templates_test.cpp), run as `cmake -D...=... -P extern_templates_check.cmake`:
#
#   -DMODE=bitwise -DTEST=<exe> -DREFERENCE=<exe>
#       both programs print the same outputs, byte for byte
#   -DMODE=declared_only -DNM=<nm> -DOBJECTS=<object files, "|"-separated> -DSOURCE=<name>
#       the object of SOURCE (built with ATTN_EXTERN_TEMPLATES) defines no attn kernel and no
#       module member function, and calls them (in the other file) for float and double
cmake_minimum_required(VERSION 3.16)

if(MODE STREQUAL "bitwise")
  foreach(exe TEST REFERENCE)
    execute_process(COMMAND "${${exe}}" OUTPUT_VARIABLE out_${exe} RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "${${exe}} failed (${rc})")
    endif()
  endforeach()
  if(NOT out_TEST STREQUAL out_REFERENCE)
    file(WRITE "${TEST}.out" "${out_TEST}")
    file(WRITE "${REFERENCE}.out" "${out_REFERENCE}")
    message(FATAL_ERROR "ATTN_EXTERN_TEMPLATES changed results: diff ${TEST}.out ${REFERENCE}.out")
  endif()
  string(REGEX MATCH "[0-9]+ outputs" count "${out_TEST}")
  message(STATUS "identical: ${count}")

elseif(MODE STREQUAL "declared_only")
  string(REPLACE "|" ";" objects "${OBJECTS}")
  list(FILTER objects INCLUDE REGEX "${SOURCE}")
  list(LENGTH objects n)
  if(NOT n EQUAL 1)
    message(FATAL_ERROR "expected one object of ${SOURCE} in ${OBJECTS}")
  endif()
  execute_process(COMMAND "${NM}" -C "${objects}" OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} ${objects} failed (${rc})")
  endif()
  string(REPLACE "\n" ";" symbols "${symbols}")
  set(kernels "attn::detail::(attention|attention_flash|attention_decode|attention_blocked|linear_into|linear_packed|linear_eigen)<")
  set(defined ${symbols})
  list(FILTER defined INCLUDE REGEX "^[0-9a-f]+ [TtWw] .*${kernels}")
  if(defined)
    list(JOIN defined "\n  " defined)
    message(FATAL_ERROR "with ATTN_EXTERN_TEMPLATES, ${SOURCE} still compiles attn's kernels:\n  ${defined}\n"
                        "(a kernel reached other than through an extern dispatch point, or one made inline?)")
  endif()
  # The modules' member functions (attn/attn.hpp's extern template classes); the implicit special
  # members (copies, destructors) are the only members a compiler still defines here.
  set(members ${symbols})
  list(FILTER members INCLUDE REGEX "^[0-9a-f]+ [TtWw] .*attn::[A-Za-z]+<(float|double)>::[a-z_][a-z_0-9]*\\(")
  if(members)
    list(JOIN members "\n  " members)
    message(FATAL_ERROR "with ATTN_EXTERN_TEMPLATES, ${SOURCE} still compiles module members:\n  ${members}")
  endif()
  foreach(T float double)  # and it did use attn in both types: through calls to the other file
    set(found ${symbols})
    list(FILTER found INCLUDE REGEX " U .*attn::[A-Za-z_:]+<${T}>")
    if(NOT found)
      message(FATAL_ERROR "${SOURCE} calls no attn kernel or module member for ${T}")
    endif()
  endforeach()
  message(STATUS "${SOURCE}: no kernel or module member defined; they are called, for float and double")

else()
  message(FATAL_ERROR "MODE must be bitwise or declared_only")
endif()
