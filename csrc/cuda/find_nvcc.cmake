# sirl_find_nvcc(): leaves CMAKE_CUDA_COMPILER set where an nvcc can be had, looking
#   1. where CMake's check_language(CUDA) looks: CMAKE_CUDA_COMPILER, $CUDACXX, PATH;
#   2. in /usr/local/cuda/bin;
#   3. in NVIDIA's compiler wheels (nvidia-cuda-nvcc and the rest of the SIRL_KERNELS_CUDA_FROM_PIP override's
#      build.requires in pyproject.toml) installed into the Python that runs the build: the isolated build
#      environment of `pip install .` when SIRL_KERNELS_CUDA_FROM_PIP=1 adds them.
# (scripts/build_csrc.sh finds its nvcc itself, with scripts/nvcc.sh, and passes it as CMAKE_CUDA_COMPILER.)
# It also sets SIRL_CUDA_TOOLKIT_ROOT, the folder above the compiler's bin/, where csrc/cuda/CMakeLists.txt finds
# the static runtime: a CUDA toolkit, or the wheels' tree.
macro(sirl_find_nvcc)
  # A persistent build tree (pyproject.toml's build-dir) outlives the isolated build environment its compiler and
  # runtime may have come from (/tmp/pip-build-env-*, deleted after each pip run): forget cached paths that no
  # longer exist, so that they are looked for again instead of failing the next build. For the compiler that
  # includes what enable_language(CUDA) recorded of it, which it would otherwise load back instead of looking.
  foreach(_sirl_var CMAKE_CUDA_COMPILER SIRL_CUDART_STATIC)
    if(${_sirl_var} AND NOT EXISTS "${${_sirl_var}}")
      message(STATUS "sirl-kernels: ${_sirl_var} ${${_sirl_var}} no longer exists: looking again")
      unset(${_sirl_var} CACHE)
      unset(${_sirl_var})
      if(_sirl_var STREQUAL "CMAKE_CUDA_COMPILER")
        file(REMOVE "${CMAKE_BINARY_DIR}/CMakeFiles/${CMAKE_VERSION}/CMakeCUDACompiler.cmake")
      endif()
    endif()
  endforeach()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(_sirl_nvcc /usr/local/cuda/bin/nvcc)
  endif()
  if(NOT CMAKE_CUDA_COMPILER AND NOT _sirl_nvcc)
    find_package(Python COMPONENTS Interpreter QUIET)
    if(Python_EXECUTABLE)
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -c "import nvidia; print(';'.join(nvidia.__path__))"
        OUTPUT_VARIABLE _sirl_nvidia_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _sirl_rc)
      if(_sirl_rc EQUAL 0)
        foreach(_sirl_dir IN LISTS _sirl_nvidia_dirs)
          file(GLOB_RECURSE _sirl_found LIST_DIRECTORIES false "${_sirl_dir}/*/bin/nvcc")
          if(_sirl_found)
            list(GET _sirl_found 0 _sirl_nvcc)
            message(STATUS "sirl-kernels: nvcc from NVIDIA's wheels: ${_sirl_nvcc}")
            break()
          endif()
        endforeach()
      endif()
    endif()
  endif()
  if(_sirl_nvcc)
    # check_language(CUDA) left a NOTFOUND both in the cache and in this scope: replace both.
    set(CMAKE_CUDA_COMPILER "${_sirl_nvcc}" CACHE FILEPATH "CUDA compiler" FORCE)
    set(CMAKE_CUDA_COMPILER "${_sirl_nvcc}")
  endif()
  if(CMAKE_CUDA_COMPILER)
    get_filename_component(SIRL_CUDA_TOOLKIT_ROOT "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    get_filename_component(SIRL_CUDA_TOOLKIT_ROOT "${SIRL_CUDA_TOOLKIT_ROOT}" DIRECTORY)
    # NVIDIA's wheels put the runtime libraries in lib/, where their nvcc.profile looks in lib64/: tell nvcc, or
    # even CMake's first test link of a CUDA program fails (cannot find -lcudart_static).
    if(NOT EXISTS "${SIRL_CUDA_TOOLKIT_ROOT}/lib64" AND EXISTS "${SIRL_CUDA_TOOLKIT_ROOT}/lib/libcudart_static.a")
      set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -L${SIRL_CUDA_TOOLKIT_ROOT}/lib")
    endif()
  endif()
endmacro()
