# Obtain the pinned llama.cpp source and apply our patches.
#
#   sdist:   llama-cpp-python==${SLICEMOE_LLAMA_CPP_PYTHON_VERSION}, downloaded with pip by name,
#            verified against native/llama-cpp-python.sha256
#   cache:   $SLICEMOE_CACHE_DIR, else $XDG_CACHE_HOME/slicemoe-gguf, else ~/.cache/slicemoe-gguf
#   tree:    <cache>/llama.cpp-<commit>-<origin>, created atomically (temp dir, rename) and made
#            again when the patches change (the stamp file holds their hash); the path stays the
#            same so that ccache still hits for every file the patches do not touch
#
# SLICEMOE_LLAMA_CPP_DIR (CMake variable or environment) points at a local llama.cpp tree of the
# same revision instead; the patches are then applied to a copy in the cache, never in place.

set(SLICEMOE_LLAMA_CPP_PYTHON_VERSION "0.3.36")
set(SLICEMOE_LLAMA_CPP_COMMIT "0c1e570")
file(READ ${CMAKE_CURRENT_LIST_DIR}/../llama-cpp-python.sha256 _sha_line)
string(REGEX MATCH "^[0-9a-f]+" SLICEMOE_SDIST_SHA256 "${_sha_line}")

function(slicemoe_cache_dir out)
    if (DEFINED ENV{SLICEMOE_CACHE_DIR} AND NOT "$ENV{SLICEMOE_CACHE_DIR}" STREQUAL "")
        set(dir "$ENV{SLICEMOE_CACHE_DIR}")
    elseif (DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
        set(dir "$ENV{XDG_CACHE_HOME}/slicemoe-gguf")
    else()
        set(dir "$ENV{HOME}/.cache/slicemoe-gguf")
    endif()
    file(MAKE_DIRECTORY "${dir}")
    set(${out} "${dir}" PARENT_SCOPE)
endfunction()

function(slicemoe_fetch_sdist cache out)
    set(name "llama_cpp_python-${SLICEMOE_LLAMA_CPP_PYTHON_VERSION}.tar.gz")
    set(sdist "${cache}/${name}")
    if (EXISTS "${sdist}")
        file(SHA256 "${sdist}" have)
        if (NOT have STREQUAL SLICEMOE_SDIST_SHA256)
            message(STATUS "slicemoe: cached ${name} has the wrong sha256, fetching it again")
            file(REMOVE "${sdist}")
        endif()
    endif()
    if (NOT EXISTS "${sdist}")
        find_package(Python3 COMPONENTS Interpreter REQUIRED)
        message(STATUS "slicemoe: downloading llama-cpp-python==${SLICEMOE_LLAMA_CPP_PYTHON_VERSION} source with pip")
        # --no-binary for this package only: with :all: pip would also build its build
        # requirements (CMake itself) from source just to read the sdist's metadata.
        # pip's build isolation hides the interpreter's site-packages (pip included) through
        # PYTHONPATH; the download runs with the interpreter's own environment instead.
        execute_process(
            COMMAND ${CMAKE_COMMAND} -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE
                    ${Python3_EXECUTABLE} -m pip download --no-deps
                    --no-binary llama-cpp-python --dest "${cache}"
                    "llama-cpp-python==${SLICEMOE_LLAMA_CPP_PYTHON_VERSION}"
            RESULT_VARIABLE rc)
        if (NOT rc EQUAL 0 OR NOT EXISTS "${sdist}")
            message(FATAL_ERROR "slicemoe: could not download the llama-cpp-python "
                    "${SLICEMOE_LLAMA_CPP_PYTHON_VERSION} sdist with pip. Put ${name} in ${cache} "
                    "or set SLICEMOE_LLAMA_CPP_DIR to a llama.cpp tree at commit ${SLICEMOE_LLAMA_CPP_COMMIT}.")
        endif()
        file(SHA256 "${sdist}" have)
        if (NOT have STREQUAL SLICEMOE_SDIST_SHA256)
            file(REMOVE "${sdist}")
            message(FATAL_ERROR "slicemoe: ${name} sha256 is ${have}, expected ${SLICEMOE_SDIST_SHA256}")
        endif()
    endif()
    set(${out} "${sdist}" PARENT_SCOPE)
endfunction()

function(slicemoe_apply_patches tree)
    file(GLOB patches "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../patches/*.patch")
    list(SORT patches)
    find_program(PATCH_EXECUTABLE patch REQUIRED)
    foreach (p IN LISTS patches)
        get_filename_component(pname "${p}" NAME)
        execute_process(
            COMMAND ${PATCH_EXECUTABLE} -p1 --forward --batch --no-backup-if-mismatch -i "${p}"
            WORKING_DIRECTORY "${tree}"
            RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
        if (NOT rc EQUAL 0)
            message(FATAL_ERROR "slicemoe: patch native/patches/${pname} does not apply to llama.cpp "
                    "${SLICEMOE_LLAMA_CPP_COMMIT}:\n${out}${err}")
        endif()
        message(STATUS "slicemoe: applied ${pname}")
    endforeach()
endfunction()

function(slicemoe_llama_source out)
    slicemoe_cache_dir(cache)
    file(GLOB patches "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../patches/*.patch")
    list(SORT patches)
    set(patch_text "")
    foreach (p IN LISTS patches)
        file(READ "${p}" t)
        string(APPEND patch_text "${t}")
    endforeach()
    string(SHA256 patch_hash "${patch_text}")

    set(local "${SLICEMOE_LLAMA_CPP_DIR}")
    if (local STREQUAL "" AND DEFINED ENV{SLICEMOE_LLAMA_CPP_DIR})
        set(local "$ENV{SLICEMOE_LLAMA_CPP_DIR}")
    endif()
    if (local STREQUAL "")
        set(origin "sdist")
    else()
        if (NOT EXISTS "${local}/src/llama-graph.cpp")
            message(FATAL_ERROR "slicemoe: SLICEMOE_LLAMA_CPP_DIR=${local} is not a llama.cpp tree")
        endif()
        string(SHA256 origin "${local}")
        string(SUBSTRING "${origin}" 0 8 origin)
        set(origin "local-${origin}")
    endif()

    set(tree "${cache}/llama.cpp-${SLICEMOE_LLAMA_CPP_COMMIT}-${origin}")
    # Two builds at once (two checkouts, or pip's isolated builds) share the cache: one fetches and
    # unpacks while the other waits, then finds the tree ready.
    file(MAKE_DIRECTORY "${cache}")
    file(LOCK "${tree}.lock" GUARD FUNCTION TIMEOUT 1800 RESULT_VARIABLE lock_error)
    if (lock_error)
        message(FATAL_ERROR "slicemoe: cannot lock ${tree}.lock: ${lock_error}")
    endif()
    set(stamp "")
    if (EXISTS "${tree}/.slicemoe-patches")
        file(READ "${tree}/.slicemoe-patches" stamp)
    endif()
    if (NOT stamp STREQUAL patch_hash)
        string(RANDOM LENGTH 8 suffix)
        set(tmp "${tree}.tmp-${suffix}")
        file(REMOVE_RECURSE "${tmp}")
        file(MAKE_DIRECTORY "${tmp}")
        if (origin STREQUAL "sdist")
            slicemoe_fetch_sdist("${cache}" sdist)
            message(STATUS "slicemoe: unpacking vendor/llama.cpp from ${sdist}")
            set(prefix "llama_cpp_python-${SLICEMOE_LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp")
            file(ARCHIVE_EXTRACT INPUT "${sdist}" DESTINATION "${tmp}/x" PATTERNS "${prefix}")
            file(RENAME "${tmp}/x/${prefix}" "${tmp}/llama.cpp")
            file(REMOVE_RECURSE "${tmp}/x")
            # the sdist keeps a git submodule link that points nowhere once unpacked
            file(REMOVE "${tmp}/llama.cpp/.git")
        else()
            message(STATUS "slicemoe: copying llama.cpp from ${local}")
            file(COPY "${local}/" DESTINATION "${tmp}/llama.cpp" PATTERN ".git" EXCLUDE)
        endif()
        slicemoe_apply_patches("${tmp}/llama.cpp")
        file(WRITE "${tmp}/llama.cpp/.slicemoe-patches" "${patch_hash}")
        file(REMOVE_RECURSE "${tree}")
        file(RENAME "${tmp}/llama.cpp" "${tree}")
        file(REMOVE_RECURSE "${tmp}")
    endif()
    message(STATUS "slicemoe: llama.cpp source ${tree}")
    set(${out} "${tree}" PARENT_SCOPE)
endfunction()
