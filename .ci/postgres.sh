# placeholder so .ci/run can source it; replaced by the store work
